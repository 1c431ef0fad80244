"""One rank's denoiser, assembled: the model folder's pipeline, its patched UNet and, when a build is
named, the segment engines for the asynchronous steps; and its slab decoder (the build's decoder
pieces, or the patched VAE). The command line's rank jobs and the served rank group both load
through here."""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.denoise import PatchParallelDenoiser
from ..core.devices import torch_dtype
from ..core.model import load_pipeline, load_vae
from ..core.patch_vae import ParallelVaeDecoder
from ..core.parallel import ParallelConfig
from ..core.ranks import RankGroup
from .engine_set import EngineSet
from .runners import check_backend_device, check_cuda_graphs

log = logging.getLogger("distrifusion.loader")

ENGINE_BACKENDS = ("torch", "onnxruntime", "tensorrt")  # torch: the eager core runs every step


def load_denoiser(model: str, ranks: RankGroup, parallel: ParallelConfig, dtype: str = "auto",
                  engine: str = "torch", engine_dir: str | None = None,
                  unet_only: bool = False, cuda_graphs: bool = False) -> PatchParallelDenoiser:
    """``unet_only``: every generation brings its conditioning (the served ranks), so no text encoder or
    VAE is loaded. ``cuda_graphs``: the segment engines replay as CUDA graphs (TensorRT only)."""
    if engine not in ENGINE_BACKENDS:
        raise ValueError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINE_BACKENDS)}")
    check_backend_device(engine, ranks.device)  # before anything is loaded
    if cuda_graphs:
        check_cuda_graphs(engine)
    pipe = load_pipeline(model, ranks.device, torch_dtype(dtype, ranks.device), unet_only=unet_only)
    engines = None if engine == "torch" else EngineSet(engine_dir, engine, cuda_graphs)
    return PatchParallelDenoiser(pipe, ranks, parallel, engines)


def load_parallel_decoder(model: str, ranks: RankGroup, engine: str = "torch", engine_dir: str | None = None,
                          vae=None) -> ParallelVaeDecoder:
    """This rank's part of the group's VAE decoder: the build's decoder pieces for this rank where the
    build has them (``build`` with ``parallel_vae``), else the patched VAE (``vae``, or the model
    folder's in float32) run eagerly."""
    import torch.distributed as dist

    from .vae_segments import SegmentedVaeDecoder

    group = dist.group.WORLD if ranks.world_size > 1 else None
    if engine != "torch":
        check_backend_device(engine, ranks.device)
        rank_dir = Path(engine_dir) / "vae" / f"rank{ranks.rank}"
        if (rank_dir / "manifest.json").is_file():
            pieces = SegmentedVaeDecoder(rank_dir, engine, ranks.world_size, ranks.device)
            if ranks.rank == 0:
                log.info("the VAE decoder runs on the build's %s pieces (%d per rank)", engine, len(pieces.runners))
            return ParallelVaeDecoder(None, group, ranks.rank, ranks.world_size, engine=pieces)
        if ranks.rank == 0:
            log.info("the build at %s has no VAE decoder pieces: the VAE decodes eagerly in torch", engine_dir)
    return ParallelVaeDecoder(vae if vae is not None else load_vae(model, ranks.device), group, ranks.rank,
                              ranks.world_size)
