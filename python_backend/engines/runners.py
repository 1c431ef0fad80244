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
    """A deserialized TensorRT engine run through Polygraphy with device tensors bound in place."""

    def __init__(self, engine_path: str | Path):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self.runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        self.runner.activate()
        engine = self.runner.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        import tensorrt as trt

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


def make_runner(backend: str, path: Path, arena: bool = True):
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path, arena=arena)
    if backend == "tensorrt":
        return TensorRTRunner(path)
    raise ValueError(f"unknown engine backend {backend!r}; allowed: onnxruntime, tensorrt")
