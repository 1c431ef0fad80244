"""``naive_patch``, the paper's baseline: N ranks in that mode give exactly N independent runs of the
unpatched UNet, each on its own slab's latent rows (zero padding at the slab borders, attention and
GroupNorm over the slab alone), and exchange nothing but the output slabs."""

import pytest
import torch

from conftest import relative_l2
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.denoise import GenerationRequest
from python_backend.core.layout import PatchLayout
from python_backend.core.model import encode_prompt, load_pipeline, make_scheduler, unet_downsampling_factor
from python_backend.core.modes import Mode
from python_backend.core.parallel import ParallelConfig
from python_backend.core.ranks import run_on_ranks

REQUEST = GenerationRequest("a red circle at the top left on a blue background", height=128, width=128, steps=4,
                            guidance=5.0, scheduler="euler", seed=2)


def _naive(ranks, model, split_cfg):
    job = GenerationJob(model, [(REQUEST, ParallelConfig(Mode.NAIVE_PATCH, 2, split_cfg=split_cfg))], decode=False,
                        progress=False)
    (output,) = run_generation_job(ranks, job)
    return output


@torch.no_grad()
def independent_slab_runs(model, slabs: int) -> torch.Tensor:
    """The denoising loop of the unpatched pipeline, run on each slab's rows alone, concatenated."""
    pipe = load_pipeline(model, torch.device("cpu"))
    cond = encode_prompt(pipe, REQUEST.prompt, None, 1, True, REQUEST.height, REQUEST.width)
    pipe.scheduler = make_scheduler(REQUEST.scheduler, pipe.scheduler.config)
    pipe.scheduler.set_timesteps(REQUEST.steps)
    latents = pipe.prepare_latents(1, 4, REQUEST.height, REQUEST.width, torch.float32, torch.device("cpu"),
                                   torch.Generator("cpu").manual_seed(REQUEST.seed))
    rows = latents.shape[2]
    factor = unet_downsampling_factor(pipe.unet.config)
    finished = []
    for index in range(slabs):
        start, stop = PatchLayout.split(rows, slabs, factor, index).row_range(rows)
        scheduler = make_scheduler(REQUEST.scheduler, pipe.scheduler.config)
        scheduler.set_timesteps(REQUEST.steps)
        slab = latents[:, :, start:stop]
        for t in scheduler.timesteps:
            noise = pipe.unet(scheduler.scale_model_input(torch.cat([slab] * 2), t), t,
                              encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs).sample
            uncond, text = noise.chunk(2)
            slab = scheduler.step(uncond + REQUEST.guidance * (text - uncond), t, slab).prev_sample
        finished.append(slab)
    return torch.cat(finished, dim=2)


@pytest.mark.parametrize("world_size, split_cfg, slabs", [(2, False, 2), (4, True, 2), (4, False, 4)])
def test_naive_patch_equals_independent_single_slab_runs(tiny_sdxl, world_size, split_cfg, slabs):
    output = run_on_ranks(world_size, _naive, (str(tiny_sdxl), split_cfg))  # rank 0's
    expected = independent_slab_runs(tiny_sdxl, slabs)
    error = relative_l2(output.latents, expected.numpy())
    print(f"\nN={world_size} {'split' if split_cfg else 'no split'}: naive_patch vs {slabs} slab runs {error:.1e}")
    assert error < 1e-5
    assert output.events == []  # no layer published anything, warm-up steps included
    # and it is not what one device computes: the seams are there
    assert relative_l2(expected.numpy(), independent_slab_runs(tiny_sdxl, 1).numpy()) > 0.05


def test_engines_refuse_naive_patch():
    from python_backend.engines.export import graph_mode

    with pytest.raises(ValueError, match="naive_patch is the quality report's baseline"):
        graph_mode(Mode.NAIVE_PATCH, 2)
