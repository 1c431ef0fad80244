"""One rank's share of ``distrifusion generate``: load, denoise patch-parallel, decode (every rank its slab
with ``parallel_vae``, else rank 0 alone)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np

from ..core.denoise import GenerationRequest
from ..core.model import decode_latents, decoding_vae, to_uint8
from ..core.parallel import ParallelConfig
from ..core.ranks import RankGroup
from ..engines.loader import load_denoiser, load_parallel_decoder

log = logging.getLogger("distrifusion.generate")


@dataclass
class GenerationJob:
    model: str
    runs: list[tuple[GenerationRequest, ParallelConfig]]
    decode: bool = True
    progress: bool = True
    dtype: str = "auto"  # "auto": float16 on CUDA, float32 on CPU
    engine: str = "torch"  # or "onnxruntime" / "tensorrt": segment engines for the asynchronous steps
    engine_dir: str | None = None  # the build folder (distrifusion build)
    parallel_vae: bool = True  # with more than one rank, every rank decodes its latent slab (core/patch_vae.py)
    cuda_graphs: bool = False  # TensorRT segment engines replay as CUDA graphs (engines/cuda_graph.py)


@dataclass
class RunOutput:
    latents: np.ndarray  # float32 [B, 4, H/8, W/8]
    images: list[np.ndarray] = field(default_factory=list)  # uint8 [H, W, 3] each, when decoded
    unet_seconds: list[float] = field(default_factory=list)
    events: list = field(default_factory=list)


def run_generation_job(ranks: RankGroup, job: GenerationJob) -> list[RunOutput]:
    denoiser = load_denoiser(job.model, ranks, job.runs[0][1], job.dtype, job.engine, job.engine_dir,
                             cuda_graphs=job.cuda_graphs)
    if job.decode:
        denoiser.pipe.vae = decoding_vae(denoiser.pipe.vae)
    decoder = None
    if job.decode and job.parallel_vae and ranks.world_size > 1:
        decoder = load_parallel_decoder(job.model, ranks, job.engine, job.engine_dir, vae=denoiser.pipe.vae)
    outputs = []
    for request, parallel in job.runs:
        progress = _StepProgress(request, parallel, ranks) if job.progress and ranks.rank == 0 else None
        result = denoiser.generate(request, parallel, on_step=progress)
        if progress is not None:
            progress.close()
        output = RunOutput(
            latents=result.latents.float().cpu().numpy(), unet_seconds=result.unet_seconds, events=result.events
        )
        if decoder is not None:
            if ranks.rank == 0:
                log.info("decoding %d image(s) with the VAE, each of %d ranks its slab", request.num_images,
                         ranks.world_size)
            images = to_uint8(decoder.decode(result.latents, denoiser.factor))
            if ranks.rank == 0:
                output.images = list(images)
        elif job.decode and ranks.rank == 0:
            log.info("decoding %d image(s) with the VAE", request.num_images)
            output.images = list(decode_latents(denoiser.pipe, result.latents))
        outputs.append(output)
    return outputs


class _StepProgress:
    def __init__(self, request: GenerationRequest, parallel: ParallelConfig, ranks: RankGroup):
        from tqdm import tqdm

        self.bar = tqdm(
            total=request.steps,
            desc=f"denoising on {ranks.world_size} rank(s), {parallel.mode.value}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def __call__(self, step: int, synchronous: bool, latents=None) -> None:
        self.bar.set_postfix_str("synchronous" if synchronous else "asynchronous", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
