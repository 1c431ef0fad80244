"""One runner interface over ONNX Runtime (CPU) and TensorRT (GPU, through Polygraphy).

A runner takes named torch tensors and returns named torch tensors on the same device, so the
orchestration in ``engine_unet.py`` is the same for both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("distrifusion.runners")


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
    """A deserialized TensorRT engine run through Polygraphy with device tensors bound in place.

    ``shared_memory``: the execution context gets no activation memory of its own
    (``USER_MANAGED``); :func:`share_device_memory` then gives one block to a set of runners that run
    one after another (the VAE decoder's pieces, whose own blocks would together hold far more than
    one decode needs)."""

    def __init__(self, engine_path: str | Path, shared_memory: bool = False):
        import tensorrt as trt
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        load = EngineFromBytes(BytesFromPath(str(engine_path)))
        self.device_memory_bytes = 0
        if shared_memory:
            self.engine = load()
            # TensorRT >= 10.1: the _v2 size, and set_device_memory(address, size) (docs/gpu.md)
            self.device_memory_bytes = self.engine.device_memory_size_v2
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self.runner = TrtRunner(self.context)
        else:
            self.runner = TrtRunner(load)
        self.runner.activate()
        engine = self.runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        torch_types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                       trt.int32: torch.int32, trt.int64: torch.int64}
        self.input_dtypes = {n: torch_types[engine.get_tensor_dtype(n)] for n in self.input_names}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {name: feeds[name].to(self.input_dtypes[name]).contiguous() for name in self.input_names}
        # torch CUDA tensors in, torch CUDA tensors out: no host round trip per step.
        return self.runner.infer(inputs, copy_outputs_to_host=False)

    def close(self) -> None:
        self.runner.deactivate()


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
    ``shared_memory`` (they must run one after another); returns it (keep it alive), or None."""
    shared = [r for r in runners if isinstance(r, TensorRTRunner) and r.device_memory_bytes]
    if not shared:
        return None
    block = torch.empty(max(r.device_memory_bytes for r in shared), dtype=torch.uint8, device="cuda")
    for runner in shared:
        runner.context.set_device_memory(block.data_ptr(), block.numel())
    return block


def make_runner(backend: str, path: Path, once_per_request: bool = False):
    """``once_per_request``: a graph among many that run one after another once per request (the VAE
    decoder's pieces): no ONNX Runtime arena, TensorRT memory shared through :func:`share_device_memory`."""
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, arena=not once_per_request)
    if backend == "tensorrt":
        return TensorRTRunner(path, shared_memory=once_per_request)
    raise ValueError(f"unknown engine backend {backend!r}; allowed: onnxruntime, tensorrt")
