"""One runner interface over ONNX Runtime (CPU) and TensorRT (GPU).

A runner takes named torch tensors and returns named torch tensors on its own device (ONNX Runtime: host
tensors; TensorRT: tensors on the rank's GPU), so the orchestration in ``segmented_unet.py`` is the same for
both. Which backend can feed which ranks is :func:`check_backend_device`'s rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.devices import resolve_device_kind
from ..core.exchange import SLOT_ALIGNMENT_BYTES

log = logging.getLogger("distrifusion.runners")


class EngineDeviceError(ValueError):
    """Engines of this backend cannot serve ranks on this device."""


def check_backend_device(backend: str, device: str | torch.device) -> None:
    """Raises :class:`EngineDeviceError` unless engines of ``backend`` can feed ranks on ``device`` (a
    ``torch.device``, a name such as "cuda:1", or a kind: "cpu", "cuda", "auto"). ONNX Runtime runs here on
    the CPU only: on GPU ranks it would hand host tensors to the NCCL exchange. TensorRT runs on GPUs only."""
    kind = resolve_device_kind(device) if device == "auto" else torch.device(device).type
    where = f"{kind} (auto)" if device == "auto" else str(device)
    if backend == "onnxruntime" and kind == "cuda":
        raise EngineDeviceError(
            f"ONNX Runtime engines run on the CPU and return host tensors; ranks on {where} exchange device "
            "tensors over NCCL. Build and run TensorRT engines for GPU ranks (build --backend tensorrt, "
            "generate --engine tensorrt), or run the ranks on the CPU (--device cpu; served: the `device` "
            "parameter of the denoiser's model config)")
    if backend == "tensorrt" and kind != "cuda":
        raise EngineDeviceError(
            f"TensorRT engines run on NVIDIA GPUs only; ranks on {where} cannot run them. Use ONNX Runtime "
            "engines for CPU ranks (build --backend onnxruntime, generate --engine onnxruntime), or run the "
            "ranks on GPUs (--device cuda)")


def check_cuda_graphs(backend: str) -> None:
    """Raises :class:`EngineDeviceError` unless ``backend``'s engines can be replayed as CUDA graphs
    (TensorRT only: the eager core interleaves the exchange with every layer, ONNX Runtime runs on the CPU)."""
    if backend != "tensorrt":
        raise EngineDeviceError(
            f"CUDA graphs replay TensorRT segment engines; the {backend!r} engine has none to capture. Use "
            "--engine tensorrt (served: the `engine` parameter) with --cuda-graphs, or leave CUDA graphs off")


class OnnxRuntimeRunner:
    """``arena=False``: the session frees its intermediates after every run instead of keeping its peak in
    an arena of its own (for graphs that run once per request, such as the decoder's many pieces, whose
    arenas would otherwise together hold far more than one decode needs)."""

    def __init__(self, path: str | Path, threads: int | None = None, arena: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = arena
        options.enable_mem_pattern = arena
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_dtypes = {i.name: _ONNX_TYPES[i.type] for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {name: feeds[name].detach().to("cpu", self.input_dtypes[name]).contiguous().numpy()
                  for name in self.input_names}
        outputs = self.session.run(self.output_names, arrays)
        return {name: torch.from_numpy(out) for name, out in zip(self.output_names, outputs)}


class TensorRTRunner:
    """A deserialized TensorRT engine (Polygraphy loads it) run with TensorRT's own API on torch's stream.

    Each run enqueues the engine with ``execute_async_v3`` on torch's current CUDA stream, or, where that is
    one of CUDA's default streams (on which TensorRT adds device-wide synchronisations), on one side stream
    per device ordered against torch's stream by CUDA events: no host copy, no host synchronisation.
    Inputs that are already right (see :func:`bindable`) are bound by their address; any other input, or
    one that lies in this runner's own outputs, is cast once per run into a staging buffer allocated at
    its first need. The engines have static shapes,
    so the outputs are allocated once and the same tensors come back from every run: **a caller must
    consume or copy them before the next run of the same runner** (``SegmentedUNet`` does, see there).
    Addresses are set only when they change.

    ``shared_memory``: the execution context gets no activation memory of its own (``USER_MANAGED``);
    :func:`share_device_memory` then gives one block to a set of runners that run one after another (the
    VAE decoder's pieces, whose own blocks would together hold far more than one decode needs). They all
    enqueue on the same stream, so they never overlap on the block.
    ``reuse_outputs=False``: fresh output tensors every run, for graphs that run once per request and
    whose outputs the caller frees as it goes (the decoder's pieces), instead of every piece holding its
    outputs for good.
    ``cuda_graph``: from the second run on, the enqueue is captured once and replayed as a CUDA graph
    (``cuda_graph.CapturedLaunch``); every input is then copied into the runner's own buffer first, so
    the graph always reads the addresses it was captured with (a device copy per input and run, instead
    of binding by address)."""

    def __init__(self, engine_path: str | Path, shared_memory: bool = False, reuse_outputs: bool = True,
                 cuda_graph: bool = False):
        import tensorrt as trt
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes

        self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine = EngineFromBytes(BytesFromPath(str(engine_path)))()
        self.device_memory_bytes = 0
        self.device_memory = None  # the shared block, kept alive while the context may use it
        if shared_memory:
            # TensorRT >= 10.1 (and 11.x, where the v1 size is gone): the _v2 size, set_device_memory(address, size)
            self.device_memory_bytes = self.engine.device_memory_size_v2
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {engine_path}")
        self.inputs, self.outputs = _io_specs(self.engine, trt)
        self.input_names = [spec.name for spec in self.inputs]
        self.input_dtypes = {spec.name: spec.dtype for spec in self.inputs}
        self._addresses: dict[str, int] = {}  # what the context holds for each I/O tensor
        self._staging: dict[str, torch.Tensor] = {}
        self._inputs_ready, self._outputs_ready = torch.cuda.Event(), torch.cuda.Event()
        self._kept_outputs = self._allocate_outputs() if reuse_outputs else None
        self._graph = None
        if cuda_graph:
            if shared_memory or not reuse_outputs:
                raise ValueError("a CUDA graph needs a runner with its own activation memory and outputs kept "
                                 "from run to run (shared_memory=False, reuse_outputs=True)")
            from .cuda_graph import CapturedLaunch

            self._graph = CapturedLaunch(self._execute, self.device, f"engine {Path(engine_path).name}")

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        for spec in self.inputs:  # any staging copy goes on torch's stream, before the engine's turn
            self._bind(spec.name, self._input_address(spec, feeds[spec.name]))
        outputs = self._kept_outputs if self._kept_outputs is not None else self._allocate_outputs()
        self._enqueue(current)
        return dict(outputs)

    def use_device_memory(self, block: torch.Tensor) -> None:
        """Runs in ``block`` (a ``shared_memory`` runner; at least ``device_memory_bytes``, 256-byte aligned)."""
        self.context.set_device_memory(block.data_ptr(), block.numel() * block.element_size())
        self.device_memory = block

    def _input_address(self, spec: "TensorSpec", tensor: torch.Tensor) -> int:
        if self._graph is None and bindable(tensor, spec, self.device, (self._kept_outputs or {}).values()):
            return tensor.data_ptr()
        staging = self._staging.get(spec.name)
        if staging is None:
            staging = self._staging[spec.name] = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
        staging.copy_(tensor.detach())
        return staging.data_ptr()

    def _allocate_outputs(self) -> dict[str, torch.Tensor]:
        outputs = {spec.name: torch.empty(spec.shape, dtype=spec.dtype, device=self.device) for spec in self.outputs}
        for name, tensor in outputs.items():
            self._bind(name, tensor.data_ptr())
        return outputs

    def _bind(self, name: str, address: int) -> None:
        if self._addresses.get(name) != address:
            if not self.context.set_tensor_address(name, address):
                raise RuntimeError(f"TensorRT refused the address of {name!r} (not 256-byte aligned?)")
            self._addresses[name] = address

    def _enqueue(self, current: "torch.cuda.Stream") -> None:
        ordered = not runs_on_current_stream(current.cuda_stream)
        stream = _side_stream(self.device) if ordered else current
        if ordered:
            self._inputs_ready.record(current)
            stream.wait_event(self._inputs_ready)
        if self._graph is not None:
            self._graph.launch(stream)
        else:
            self._execute(stream)
        if ordered:
            self._outputs_ready.record(stream)
            current.wait_event(self._outputs_ready)

    def _execute(self, stream: "torch.cuda.Stream") -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's log above)")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a static-shape engine."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


TENSORRT_ALIGNMENT_BYTES = SLOT_ALIGNMENT_BYTES  # TensorRT: every I/O tensor address is 256-byte aligned

CUDA_DEFAULT_STREAM_HANDLES = (0, 1, 2)  # the legacy default stream (0, cudaStreamLegacy) and cudaStreamPerThread


def bindable(tensor: torch.Tensor, spec: TensorSpec, device: torch.device, own_outputs=()) -> bool:
    """Whether the engine can read ``tensor`` where it lies: on its device, in its dtype, contiguous,
    aligned, and outside the engine's ``own_outputs`` (an engine must not read what it writes: a transport
    that hands a published buffer back as the next step's stale input would do that); otherwise the
    runner copies it into a staging buffer. A shape the engine was not built for is an error (a copy
    would broadcast it silently)."""
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(f"engine input {spec.name!r}: shape {tuple(tensor.shape)}, the engine was built for "
                         f"{spec.shape}")
    return (tensor.device == device and tensor.dtype == spec.dtype and tensor.is_contiguous()
            and tensor.data_ptr() % TENSORRT_ALIGNMENT_BYTES == 0 and not overlaps(tensor, own_outputs))


def overlaps(tensor: torch.Tensor, others) -> bool:
    """Whether the memory of ``tensor`` (contiguous) overlaps that of any of ``others`` (contiguous)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(start < other.data_ptr() + other.numel() * other.element_size() and other.data_ptr() < end
               for other in others)


def runs_on_current_stream(stream_handle: int) -> bool:
    """Whether the engine can run on the stream with this handle (torch's current stream): not on a CUDA
    default stream, where TensorRT synchronises the whole device around its work."""
    return stream_handle not in CUDA_DEFAULT_STREAM_HANDLES


_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """One stream per device for every runner: runners that share activation memory never overlap."""
    if device.index not in _SIDE_STREAMS:
        _SIDE_STREAMS[device.index] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device.index]


def _io_specs(engine, trt) -> tuple[list[TensorSpec], list[TensorSpec]]:
    torch_types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                   trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.uint8: torch.uint8,
                   trt.bool: torch.bool}
    inputs, outputs = [], []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = tuple(engine.get_tensor_shape(name))
        if any(length < 0 for length in shape):
            raise ValueError(f"engine tensor {name!r} has a dynamic shape {shape}; the builds use static shapes")
        spec = TensorSpec(name, shape, torch_types[engine.get_tensor_dtype(name)])
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return inputs, outputs


# Each graph input's dtype, as ONNX Runtime names it: feeds are cast to what the graph declares.
_ONNX_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


def build_tensorrt_engine(onnx_path: Path, engine_path: Path, timing_cache: Path) -> None:
    """Compiles one ONNX graph for the GPU in use (static shapes), strongly typed: the graph's own types
    decide every layer's precision (fp16 graphs keep their float32 casts around the GroupNorm moments),
    not the builder's FP16 flag, which TensorRT 10.12 deprecated and 11 removed."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    config = CreateConfig(load_timing_cache=str(timing_cache) if timing_cache.exists() else None)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    build = SaveEngine(
        EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache)),
        path=str(engine_path),
    )
    build()


def share_device_memory(runners) -> torch.Tensor | None:
    """One block of device memory, as large as the largest need, for every TensorRT runner made with
    ``shared_memory`` (they must run one after another); returns it (the runners keep it alive), or None."""
    shared = [r for r in runners if isinstance(r, TensorRTRunner) and r.device_memory_bytes]
    if not shared:
        return None
    block = torch.empty(max(r.device_memory_bytes for r in shared), dtype=torch.uint8, device=shared[0].device)
    for runner in shared:
        runner.use_device_memory(block)
    return block


def make_runner(backend: str, path: Path, once_per_request: bool = False, cuda_graph: bool = False):
    """``once_per_request``: a graph among many that run one after another once per request (the VAE
    decoder's pieces): no ONNX Runtime arena, TensorRT memory shared through :func:`share_device_memory`.
    ``cuda_graph``: TensorRT only (see :func:`check_cuda_graphs`), replayed as a CUDA graph."""
    if cuda_graph:
        check_cuda_graphs(backend)
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, arena=not once_per_request)
    if backend == "tensorrt":
        return TensorRTRunner(path, shared_memory=once_per_request, reuse_outputs=not once_per_request,
                              cuda_graph=cuda_graph)
    raise ValueError(f"unknown engine backend {backend!r}; allowed: onnxruntime, tensorrt")
