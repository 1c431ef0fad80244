"""N = 1 equals diffusers' own pipeline on the same folder, prompt, scheduler, steps, guidance and seed."""

import pytest
import torch

from conftest import relative_l2
from python_backend.core.denoise import GenerationRequest
from python_backend.core.parallel import ParallelConfig
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.modes import Mode
from python_backend.core.ranks import RankGroup


def _ours(model, request, mode=Mode.CORRECTED_ASYNC_GN):
    job = GenerationJob(str(model), [(request, ParallelConfig(mode=mode))], decode=False, progress=False)
    return run_generation_job(RankGroup.single(), job)[0].latents


def _diffusers_scheduler(name, config):
    """The scheduler a diffusers user picks for each of our names, built with diffusers' own classes
    (not through the project's mapping, which is what is under test)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name == "dpmpp-2m":  # DPM-Solver++ (2M): second-order multistep, diffusers' documented recipe
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":  # a latent diffusion model's DDIM never clips (SD and SDXL configs say so themselves)
        return DDIMScheduler.from_config(config, clip_sample=False)
    classes = {"euler": EulerDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler}
    return classes[name].from_config(config)


def _diffusers(pipeline_class, model, request):
    pipe = pipeline_class.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _diffusers_scheduler(request.scheduler, pipe.scheduler.config)
    return pipe(
        request.prompt,
        negative_prompt=request.negative_prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        num_images_per_prompt=request.num_images,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent",
    ).images.numpy()


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpmpp-2m"])
def test_single_rank_equals_diffusers_sdxl(tiny_sdxl, scheduler):
    from diffusers import StableDiffusionXLPipeline

    request = GenerationRequest("a photo of an astronaut riding a horse", height=256, width=192, steps=6,
                                guidance=5.0, scheduler=scheduler, seed=11)
    # N = 1 runs the same patch layers in every mode; the default (asynchronous) mode must be exact too.
    assert relative_l2(_ours(tiny_sdxl, request), _diffusers(StableDiffusionXLPipeline, tiny_sdxl, request)) < 1e-4


def test_single_rank_equals_diffusers_sdxl_negative_prompt_and_batch(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    request = GenerationRequest("a red cube", negative_prompt="blurry", height=128, width=128, steps=4,
                                guidance=7.5, scheduler="euler", seed=5, num_images=2)
    ours = _ours(tiny_sdxl, request, Mode.FULL_SYNC)
    assert ours.shape == (2, 4, 16, 16)
    assert relative_l2(ours, _diffusers(StableDiffusionXLPipeline, tiny_sdxl, request)) < 1e-4


def test_single_rank_equals_diffusers_without_guidance(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    request = GenerationRequest("a red cube", height=128, width=128, steps=4, guidance=1.0, seed=2)
    assert relative_l2(_ours(tiny_sdxl, request), _diffusers(StableDiffusionXLPipeline, tiny_sdxl, request)) < 1e-4


def test_single_rank_equals_diffusers_sd15(tiny_sd15):
    from diffusers import StableDiffusionPipeline

    request = GenerationRequest("a watercolor fox", height=256, width=256, steps=5, guidance=6.0,
                                scheduler="ddim", seed=4)
    assert relative_l2(_ours(tiny_sd15, request), _diffusers(StableDiffusionPipeline, tiny_sd15, request)) < 1e-4
