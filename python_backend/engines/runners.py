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
    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arrays = {name: _graph_dtype(feeds[name]).detach().cpu().contiguous().numpy() for name in self.input_names}
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

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {name: _graph_dtype(feeds[name]).contiguous() for name in self.input_names}
        # torch CUDA tensors in, torch CUDA tensors out: no host round trip per step.
        return self.runner.infer(inputs, copy_outputs_to_host=False)

    def close(self) -> None:
        self.runner.deactivate()


def _graph_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """Graphs are exported in float32 (TensorRT lowers to fp16 inside); half inputs are widened."""
    return tensor.float() if tensor.is_floating_point() else tensor


def build_tensorrt_engine(onnx_path: Path, engine_path: Path, fp16: bool, timing_cache: Path) -> None:
    """Compiles one ONNX graph for the GPU in use (static shapes), sharing a timing cache."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    config = CreateConfig(fp16=fp16, load_timing_cache=str(timing_cache) if timing_cache.exists() else None)
    build = SaveEngine(
        EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path)), config=config, save_timing_cache=str(timing_cache)),
        path=str(engine_path),
    )
    build()


def make_runner(backend: str, path: Path):
    if backend == "onnxruntime":
        return OnnxRuntimeRunner(path)
    if backend == "tensorrt":
        return TensorRTRunner(path)
    raise ValueError(f"unknown engine backend {backend!r}; allowed: onnxruntime, tensorrt")
