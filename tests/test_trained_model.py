"""The trained embedded model (issue 9): the shipped weights load with diffusers and draw what their
captions say; the training code runs end to end and never trains on the held-out captions; the CLI
writes the trained model by default and a random one on request."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from python_backend.embedded import training
from python_backend.embedded.tiny_model import TRAINED_SDXL, write_tiny_sdxl, write_trained_sdxl

CAPTIONS = 8  # held-out captions drawn here (the quality report reads 50)


def test_held_out_captions_are_never_trained_on():
    held_out = {spec.caption() for spec in training.held_out_specs()}
    assert len(held_out) == training.HELD_OUT_COUNT
    trained = {caption for _, caption in training._training_scenes(600, seed=3)}
    assert not held_out & trained
    assert len(trained) > 500  # the training set is varied, not a few repeated scenes


def test_training_runs_end_to_end_and_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    config = training.TrainingConfig(vae_steps=3, vae_full_steps=2, vae_full_batch=1, vae_batch=2, images=8,
                                     unet_steps=3, unet_batch=4, log_every=1)
    out = training.train_tiny_model(tmp_path / "model", config)
    record = json.loads((out / "training.json").read_text())
    assert len(record["vae_losses"]) == 3 + 2 and len(record["unet_losses"]) == 3
    assert record["scaling_factor"] > 0 and (out / "loss_curve.png").stat().st_size > 1000
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.unet.config.layers_per_block == training.TRAINED_UNET["layers_per_block"]
    assert tuple(pipe.vae.config.block_out_channels) == training.TRAINED_VAE["block_out_channels"]
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    # sampling starts from pure noise at the last training timestep, as the model was trained
    scheduler = pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == 999
    # a second run takes the first one's VAE stage instead of training its own, and keeps its losses; with
    # text_encoder_lr 0 its text encoders keep their seeded weights
    frozen = dataclasses.replace(config, text_encoder_lr=0.0)
    again = training.train_tiny_model(tmp_path / "again", frozen, vae_from=out / "vae_stage")
    # a trained pipeline's vae folder is a VAE stage too (its losses come from the pipeline's training.json)
    assert training._vae_stage_losses(out / "vae") == record["vae_losses"]
    seeded = write_tiny_sdxl(tmp_path / "seeded", seed=config.seed)
    for folder in ("text_encoder", "text_encoder_2"):
        weights = (again / folder / "model.safetensors").read_bytes()
        assert weights == (seeded / folder / "model.safetensors").read_bytes(), folder
        assert weights != (out / folder / "model.safetensors").read_bytes(), folder  # the first run trained them
    assert json.loads((again / "training.json").read_text())["vae_losses"] == record["vae_losses"]
    assert (again / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size == \
        (out / "vae" / "diffusion_pytorch_model.safetensors").stat().st_size
    loaded = StableDiffusionXLPipeline.from_pretrained(again, local_files_only=True).vae
    for (name, a), b in zip(pipe.vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not (TRAINED_SDXL / "model_index.json").is_file(), reason="the trained weights are not shipped")
def test_the_trained_model_loads_and_draws_its_captions(tmp_path):
    from python_backend.core.denoise import GenerationRequest, PatchParallelDenoiser
    from python_backend.core.model import decode_latents, encode_prompt, load_pipeline
    from python_backend.core.parallel import ParallelConfig
    from python_backend.core.ranks import RankGroup
    from python_backend.embedded.caption_checker import check, per_attribute_accuracy

    model = write_trained_sdxl(tmp_path / "trained")
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    specs = training.held_out_specs(CAPTIONS)
    pipe = load_pipeline(model, torch.device("cpu"))
    denoiser = PatchParallelDenoiser(pipe, RankGroup.single(), ParallelConfig())
    request = GenerationRequest("", height=256, width=256, steps=20, guidance=training.SAMPLING_GUIDANCE, scheduler="euler", seed=0,
                                num_images=CAPTIONS)
    with torch.no_grad():
        cond = encode_prompt(pipe, [s.caption() for s in specs], None, 1, True, 256, 256)
        images = decode_latents(pipe, denoiser.generate(request, cond=cond).latents)
    per = per_attribute_accuracy([(check(image), spec) for image, spec in zip(images, specs)])
    print(f"\nchecker on {CAPTIONS} held-out captions: {per}")
    # measured 0.90 on these 8 (shape 0.5, colour, position, size, background 1.0; chance is about 0.23); 0.916 on
    # all 50 (docs/embedded_model.md). The weights before the object-weighted loss: 0.525 here, position 0
    assert np.mean(list(per.values())) >= 0.8, per
    assert per["position"] >= 0.75 and per["colour"] >= 0.75, per  # what weighting the loss by the object fixed
    assert per["background"] >= 0.75 and per["size"] >= 0.75, per  # what the zero-SNR schedule and the VAE fixed


def test_the_command_writes_the_trained_model_by_default_and_random_weights_on_request(tmp_path):
    def tiny_model(*args):
        done = subprocess.run([sys.executable, "-m", "python_backend.cli", "tiny-model", *args], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    if (TRAINED_SDXL / "model_index.json").is_file():
        assert "trained" in tiny_model(str(tmp_path / "default"))
        assert (tmp_path / "default" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
            (TRAINED_SDXL / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert "random weights (seed 3)" in tiny_model(str(tmp_path / "random"), "--random", "--seed", "3")
    assert "random weights" in tiny_model(str(tmp_path / "sd15"), "--family", "sd15")
    config = json.loads((tmp_path / "random" / "unet" / "config.json").read_text())
    assert config["layers_per_block"] == 2  # the random test model's layout, not the trained one's


def test_every_scheduler_keeps_the_trained_schedule_and_never_clips_latents():
    from python_backend.core.defaults import SCHEDULERS
    from python_backend.core.model import make_scheduler

    config = training.sampling_scheduler().config
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, config)
        scheduler.set_timesteps(20)
        assert scheduler.config.prediction_type == "v_prediction", name
        assert int(scheduler.timesteps[0]) == 999, name  # trailing: the first step is the pure-noise one
        assert not getattr(scheduler.config, "clip_sample", False), name  # DDIM's default would clip latents


@pytest.mark.slow
@pytest.mark.skipif(not (TRAINED_SDXL / "model_index.json").is_file(), reason="the trained weights are not shipped")
def test_corrected_group_norm_stays_near_one_device_where_a_slabs_statistics_jump(tmp_path):
    """The held-out caption where corrected asynchronous GroupNorm blew up at N = 4 (latent error 2.66, 12 dB):
    an object appearing in one slab moved its mean so far that the corrected E[x^2] - E[x]^2 cancelled to
    nearly zero, and that group's activations were multiplied. The within-slab variance floor holds it."""
    from python_backend.cli.generate_job import GenerationJob, run_generation_job
    from python_backend.core.denoise import GenerationRequest
    from python_backend.core.modes import Mode
    from python_backend.core.parallel import ParallelConfig
    from python_backend.core.ranks import run_on_ranks

    model = str(write_trained_sdxl(tmp_path / "trained"))
    caption = training.held_out_specs(2)[1].caption()
    request = GenerationRequest(caption, height=256, width=256, steps=20, guidance=training.SAMPLING_GUIDANCE,
                                scheduler="euler", seed=0)

    def final_latents(world_size, parallel):
        job = GenerationJob(model, [(request, parallel)], decode=False, progress=False, dtype="float32")
        return run_on_ranks(world_size, run_generation_job, (job,))[0].latents

    one = final_latents(1, ParallelConfig(Mode.FULL_SYNC))
    four = final_latents(4, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 4, split_cfg=False))
    error = float(np.linalg.norm(four - one) / np.linalg.norm(one))
    print(f"\nN = 4 corrected_async_gn on {caption!r}: latent rel L2 {error:.3f}")
    assert np.isfinite(four).all()
    assert error < 0.3  # 0.075 measured with the floor, 2.66 without (NaN with a bare clamp at zero)
