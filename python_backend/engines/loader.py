"""One rank's denoiser, assembled: the model folder's pipeline, its patched UNet and, when a build is
named, the segment engines for the asynchronous steps. The command line's rank jobs and the served
rank group both load through here."""

from __future__ import annotations

from ..core.denoise import PatchParallelDenoiser
from ..core.devices import torch_dtype
from ..core.model import load_pipeline
from ..core.parallel import ParallelConfig
from ..core.ranks import RankGroup
from .engine_set import EngineSet

ENGINE_BACKENDS = ("torch", "onnxruntime", "tensorrt")  # torch: the eager core runs every step


def load_denoiser(model: str, ranks: RankGroup, parallel: ParallelConfig, dtype: str = "auto",
                  engine: str = "torch", engine_dir: str | None = None,
                  unet_only: bool = False) -> PatchParallelDenoiser:
    """``unet_only``: every generation brings its conditioning (the served ranks), so no text encoder or
    VAE is loaded."""
    if engine not in ENGINE_BACKENDS:
        raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINE_BACKENDS)}")
    pipe = load_pipeline(model, ranks.device, torch_dtype(dtype, ranks.device), unet_only=unet_only)
    engines = None if engine == "torch" else EngineSet(engine_dir, engine)
    return PatchParallelDenoiser(pipe, ranks, parallel, engines)
