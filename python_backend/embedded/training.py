"""Train the embedded default model on the procedural shapes data (``shapes.py``), on CPU.

The architecture is the tiny SDXL layout of ``tiny_model.py`` (two CLIP text encoders, pooled text
embeddings and time ids, AutoencoderKL, UNet2DConditionModel). Training, in order:

1. **VAE**: reconstruction (mean squared error in [-1, 1]) with a very small KL term, on crops of
   rendered images, three quarters of them centred on the object (random crops alone taught it the
   backgrounds and left small objects' colours wrong), wider than the random test VAE at its two lowest
   levels (:data:`TRAINED_VAE`); then the latent scaling factor is set to 1 / std of the latents, as
   Stable Diffusion's VAEs were. The stage is saved on its own (``OUT/vae_stage``) so that a later run
   can start from it (``vae_from``).
2. **Latents**: a fixed set of rendered images is encoded once (the latent distribution's mean).
3. **UNet**: v-prediction on SDXL's betas rescaled to zero terminal SNR (:data:`NOISE_SCHEDULE`; the
   shipped scheduler samples with trailing timesteps from pure noise), each timestep's loss weighted by
   min(1, (1 + gamma) / (1 + SNR)) so that the steps which only sharpen edges count less, with
   classifier-free-guidance dropout: a dropped caption is the zero conditioning, exactly what the SDXL
   pipeline feeds the unconditional half for an empty negative prompt (``force_zeros_for_empty_prompt``).
   The two text encoders **train with the UNet** from their seeded random weights (``text_encoder_lr``
   0 keeps them frozen and encodes every caption once); trained this way they lose what separates
   positions and shapes (docs/embedded_model.md). The
   UNet is the tiny SDXL layout with one ResNet and one transformer layer per block
   (:data:`TRAINED_UNET`): half the random test model's compute, so that it trains in about an hour on
   2 CPU cores.

Captions of :func:`held_out_specs` never appear in training: the quality report reads images of
them. Every stage logs its progress; the losses are kept for the curve (``loss_curve.png``).
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import shapes

log = logging.getLogger("distrifusion.training")

TRAINED_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 1, 1))
"""How the trained model's UNet differs from ``tiny_model._sdxl_unet_config`` (same blocks, levels,
channels, attention and conditioning)."""
TRAINED_VAE = dict(block_out_channels=(16, 32, 64, 64))
"""How the trained model's VAE differs from ``tiny_model._vae_config``: wider at the two lowest levels
(the 16-32-32-32 VAE decoded objects in the wrong colour); full resolution stays 16 channels, so decoding
costs little more."""
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      rescale_betas_zero_snr=True, prediction_type="v_prediction")
"""SDXL's betas rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed"), so the last timestep is pure noise, with v-prediction (epsilon is undefined there).
With SDXL's own schedule the last timestep keeps 7 % of the image: the model learns to read the
background colour and the object's place from that leak instead of from the caption, and at sampling time,
when the leak is missing, it takes them from the random starting noise."""
SAMPLING_GUIDANCE = 3.0
"""The classifier-free guidance the trained model draws its captions best at (docs/embedded_model.md: 50
held-out captions, 20 Euler steps: 91.2 % of attributes at 2, 91.6 % at 3, 88.4 % at 4, 86.4 % at 5,
81.2 % at 8); the quick start and the quality report use it."""
HELD_OUT_SEED = 90_000
HELD_OUT_COUNT = 50


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    size: int = 256  # image side (latents are size / 8)
    vae_steps: int = 3000
    vae_batch: int = 8
    vae_crop: int = 64  # the VAE is convolutional: small crops train it at a quarter of the cost
    vae_object_crops: float = 0.75  # share of crops centred on the object (a random crop is mostly background)
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_full_steps: int = 600  # then whole images: GroupNorm must see a whole image's statistics
    vae_full_batch: int = 2
    vae_full_lr: float = 2e-4
    vae_object_weight: float = 10.0  # whole images: an object pixel's error counts 1 + this much
    images: int = 8000  # the fixed training set the UNet sees
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_lr: float = 2e-3
    text_encoder_lr: float = 5e-4  # the text encoders train with the UNet from seeded random weights; 0: frozen
    unet_warmup_steps: int = 200
    snr_gamma: float = 5.0  # v-loss weight min(1, (1 + gamma) / (1 + SNR)): detail-only timesteps count less
    # a latent pixel's error counts 1 + this much times the object's coverage: the object is 2-7 % of the
    # image, and unweighted the loss is the background's (the model never learned position or shape)
    unet_object_weight: float = 10.0
    cfg_dropout: float = 0.1
    threads: int = 2
    log_every: int = 50
    checkpoint_every: int = 0  # > 0: the pipeline is saved to OUT/checkpoint every so many UNet steps


@dataclass
class TrainingLog:
    config: dict = field(default_factory=dict)
    vae_losses: list[float] = field(default_factory=list)
    unet_losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    scaling_factor: float = 0.0


def held_out_specs(count: int = HELD_OUT_COUNT, seed: int = HELD_OUT_SEED) -> list[shapes.SceneSpec]:
    """The captions the model never trains on (distinct scenes, reproducible)."""
    rng, found = np.random.default_rng(seed), []
    while len(found) < count:
        spec = shapes.random_scene(rng)
        if spec not in found:
            found.append(spec)
    return found


def _training_scenes(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    return [(image, caption) for image, caption, _ in _training_scenes_with_coverage(n, seed)]


def _training_scenes_with_coverage(n: int, seed: int) -> list[tuple[np.ndarray, str, np.ndarray]]:
    """(image, caption, object coverage [256, 256]) of ``n`` scenes, held-out captions excluded."""
    excluded = set(held_out_specs())
    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        spec = shapes.random_scene(rng)
        if spec in excluded:
            continue
        image, coverage = shapes.render_with_coverage(spec, 256, rng)
        scenes.append((image, spec.caption(), coverage))
    return scenes


def latent_loss_weights(coverages: list[np.ndarray], factor: int, object_weight: float) -> torch.Tensor:
    """Per latent pixel [n, 1, h, w]: 1 + ``object_weight`` x the object's coverage of that pixel's
    ``factor`` x ``factor`` image pixels, divided by each image's mean so that a step's loss keeps its scale.
    The object is 2-7 % of an image: unweighted, the background's error drowns where and what the object is."""
    coverage = torch.from_numpy(np.stack(coverages)).float()[:, None]
    weights = 1 + object_weight * F.avg_pool2d(coverage, factor)
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _crop_corners(specs, config: TrainingConfig, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Top-left corners of the VAE's training crops: a share centred near each scene's object, the rest anywhere."""
    limit, corners = config.size - config.vae_crop, []
    for spec in specs:
        if rng.random() < config.vae_object_crops:
            row, col = shapes.POSITIONS[spec.position]
            centre = np.array([shapes.CELL_CENTRES[row], shapes.CELL_CENTRES[col]]) * config.size
            corner = centre - config.vae_crop / 2 + rng.uniform(-config.vae_crop / 4, config.vae_crop / 4, size=2)
            corners.append(tuple(int(v) for v in np.clip(np.rint(corner), 0, limit)))
        else:
            corners.append(tuple(int(v) for v in rng.integers(0, limit + 1, size=2)))
    return corners


def _vae_step(vae, batch: torch.Tensor, optimizer, generator, config: TrainingConfig,
              weights: torch.Tensor | None = None) -> float:
    posterior = vae.encode(batch).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    error = (reconstruction - batch).pow(2)
    error = error if weights is None else error * weights
    loss = error.mean() + config.vae_kl_weight * posterior.kl().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _vae_phase(vae, phase: str, steps: int, lr: float, seed: int, make_batch, config: TrainingConfig,
               record: TrainingLog) -> None:
    """``steps`` optimizer steps on ``make_batch(rng)`` = (images, loss weights or None), a fresh AdamW with
    warm-up and cosine decay, its own seeded generators; the losses go to ``record.vae_losses``."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, lr, 50, steps)
        batch, weights = make_batch(rng)
        record.vae_losses.append(_vae_step(vae, batch, optimizer, generator, config, weights))
        if step % config.log_every == 0 or step == steps - 1:
            log.info("VAE step %d/%d (%s): loss %.5f (%.0f s)", step + 1, steps, phase,
                     float(np.mean(record.vae_losses[-config.log_every:])), time.perf_counter() - started)
    vae.eval()
    record.seconds[f"vae_{phase.replace(' ', '_')}"] = time.perf_counter() - started


def train_vae(vae, config: TrainingConfig, record: TrainingLog) -> None:
    """Crops first (cheap: the VAE is convolutional), then whole images (:func:`finish_vae_on_whole_images`)."""
    def crops(rng):
        specs = [shapes.random_scene(rng) for _ in range(config.vae_batch)]
        batch = _to_tensor([shapes.render(spec, config.size, rng) for spec in specs])
        return torch.stack([image[:, top:top + config.vae_crop, left:left + config.vae_crop]
                            for image, (top, left) in zip(batch, _crop_corners(specs, config, rng))]), None

    _vae_phase(vae, "crops", config.vae_steps, config.vae_lr, config.seed + 1, crops, config, record)
    finish_vae_on_whole_images(vae, config, record)


def finish_vae_on_whole_images(vae, config: TrainingConfig, record: TrainingLog) -> None:
    """Fine-tunes on whole images. GroupNorm normalises over the whole map, and an object fills a crop
    centred on it several times more than it fills the image: trained on crops alone, the VAE decoded
    whole images' objects in the wrong colour (44 % read right, 72 % after 600 whole-image steps). The
    object is a few percent of a whole image, so its pixels weigh ``1 + vae_object_weight`` in the loss."""
    def whole_images(rng):
        drawn = [shapes.render_with_coverage(shapes.random_scene(rng), config.size, rng)
                 for _ in range(config.vae_full_batch)]
        coverage = torch.from_numpy(np.stack([c for _, c in drawn])).float()[:, None]
        return _to_tensor([image for image, _ in drawn]), 1 + config.vae_object_weight * coverage

    _vae_phase(vae, "whole images", config.vae_full_steps, config.vae_full_lr, config.seed + 4, whole_images,
               config, record)


@torch.no_grad()
def encode_scenes(vae, scenes, batch: int = 32) -> torch.Tensor:
    """The latent means of ``scenes`` (unscaled)."""
    started, parts = time.perf_counter(), []
    for i in range(0, len(scenes), batch):
        parts.append(vae.encode(_to_tensor([image for image, _ in scenes[i:i + batch]])).latent_dist.mean)
        if (i // batch) % 25 == 0:
            log.info("encoded %d/%d training images (%.0f s)", i + len(parts[-1]), len(scenes),
                     time.perf_counter() - started)
    return torch.cat(parts)


def tokenize_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tokenizers' padded ids [len(captions), 77] for ``captions``, as the SDXL pipeline pads them."""
    return tuple(tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
                 for tokenizer in (pipe.tokenizer, pipe.tokenizer_2))


def encode_tokens(pipe, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, 77, D1 + D2], pooled [B, P]) with gradients, the way ``encode_prompt`` computes them:
    each encoder's penultimate hidden states side by side, the pooled embedding from the second's projection."""
    first = pipe.text_encoder(ids_1, output_hidden_states=True)
    second = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second[0]


def _check_encoding_matches_pipeline(pipe, captions: list[str]) -> None:
    with torch.no_grad():
        embeds, pooled = encode_tokens(pipe, *tokenize_captions(pipe, captions))
        want_embeds, _, want_pooled, _ = pipe.encode_prompt(captions, device=torch.device("cpu"),
                                                            num_images_per_prompt=1, do_classifier_free_guidance=False)
    if not (torch.allclose(embeds, want_embeds, atol=1e-5) and torch.allclose(pooled, want_pooled, atol=1e-5)):
        raise RuntimeError("training's text encoding differs from StableDiffusionXLPipeline.encode_prompt")


def train_unet(pipe, latents: torch.Tensor, captions: list[str], config: TrainingConfig, record: TrainingLog,
               checkpoint: pathlib.Path | None = None, pixel_weights: torch.Tensor | None = None) -> None:
    """``pixel_weights``: [n, 1, h, w] per latent pixel of each training latent (``latent_loss_weights``)."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    noise_schedule = DDPMScheduler(**NOISE_SCHEDULE)
    snr = noise_schedule.alphas_cumprod / (1 - noise_schedule.alphas_cumprod)
    loss_weights = torch.clamp((1 + config.snr_gamma) / (1 + snr), max=1.0)
    _check_encoding_matches_pipeline(pipe, captions[:4])
    ids_1, ids_2 = tokenize_captions(pipe, captions)
    text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
    time_ids = torch.tensor([[config.size, config.size, 0, 0, config.size, config.size]], dtype=torch.float32)
    generator = torch.Generator().manual_seed(config.seed + 2)
    frozen_text = config.text_encoder_lr == 0  # the encoders keep their seeded weights: encode every caption once
    groups = [{"params": list(unet.parameters()), "base_lr": config.unet_lr}]
    if not frozen_text:
        groups.append({"params": [p for encoder in text_encoders for p in encoder.parameters()],
                       "base_lr": config.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.unet_lr, weight_decay=1e-2)
    trained = [p for group in groups for p in group["params"]]
    learning = (unet,) if frozen_text else (unet, *text_encoders)
    for module in learning:
        module.train()
        module.requires_grad_(True)
    if frozen_text:
        log.info("text encoders frozen: encoding the %d captions once", len(captions))
        with torch.no_grad():
            all_embeds, all_pooled = encode_tokens(pipe, ids_1, ids_2)
        conditioning = lambda index: (all_embeds[index], all_pooled[index])  # noqa: E731
    else:
        conditioning = lambda index: encode_tokens(pipe, ids_1[index], ids_2[index])  # noqa: E731
    started = time.perf_counter()
    for step in range(config.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, group["base_lr"], config.unet_warmup_steps, config.unet_steps)
        index = torch.randint(0, len(latents), (config.unet_batch,), generator=generator)
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (config.unet_batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        keep = (torch.rand(config.unet_batch, generator=generator) >= config.cfg_dropout).float()
        embeds, pooled = conditioning(index)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds * keep[:, None, None],
                          added_cond_kwargs={"text_embeds": pooled * keep[:, None],
                                             "time_ids": time_ids.expand(config.unet_batch, -1)}).sample
        target = noise_schedule.get_velocity(clean, noise, timesteps)
        error = (prediction - target).pow(2)
        if pixel_weights is not None:
            error = error * pixel_weights[index]
        loss = (loss_weights[timesteps] * error.mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        record.unet_losses.append(float(loss.detach()))
        if step % config.log_every == 0 or step == config.unet_steps - 1:
            elapsed = time.perf_counter() - started
            log.info("UNet step %d/%d: loss %.5f (%.0f s, about %.0f s left)", step + 1, config.unet_steps,
                     float(np.mean(record.unet_losses[-config.log_every:])), elapsed,
                     elapsed / (step + 1) * (config.unet_steps - step - 1))
        if checkpoint is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            pipe.save_pretrained(checkpoint, safe_serialization=True)
            log.info("checkpoint after %d UNet steps written to %s", step + 1, checkpoint)
    for module in learning:
        module.eval()
        module.requires_grad_(False)
    record.seconds["unet"] = time.perf_counter() - started


def sampling_scheduler():
    """The trained model's scheduler: Euler on :data:`NOISE_SCHEDULE` with trailing timesteps, so that the
    first sampling step starts from pure noise at the last training timestep."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**NOISE_SCHEDULE, timestep_spacing="trailing")


def _vae_stage_losses(folder: pathlib.Path) -> list[float]:
    """The losses of a VAE stage: its own ``vae_losses.json``, or, for a trained pipeline's ``vae`` folder
    (the shipped model's VAE is its VAE stage), the pipeline's ``training.json``."""
    for path, key in ((folder / "vae_losses.json", None), (folder.parent / "training.json", "vae_losses")):
        if path.is_file():
            loaded = json.loads(path.read_text())
            return loaded[key] if key else loaded
    return []


def train_vae_stage(out_dir: pathlib.Path, config: TrainingConfig, record: TrainingLog):
    """The first stage on its own: a new VAE trained from ``config.seed``, saved to ``out_dir`` with its losses."""
    from diffusers import AutoencoderKL

    from .tiny_model import _vae_config

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(**{**_vae_config(scaling_factor=1.0), **TRAINED_VAE})
    log.info("training the VAE: %d steps of %d crops of %d px", config.vae_steps, config.vae_batch, config.vae_crop)
    train_vae(vae, config, record)
    vae.save_pretrained(out_dir, safe_serialization=True)
    (pathlib.Path(out_dir) / "vae_losses.json").write_text(json.dumps(record.vae_losses))
    return vae


def train_tiny_model(out_dir, config: TrainingConfig = TrainingConfig(),
                     vae_from: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes the trained pipeline (diffusers layout), ``training.json`` and ``loss_curve.png``.

    ``vae_from``: a folder with the VAE that the first stage of a run with the same seed and VAE settings
    wrote (``OUT/vae_stage``, or a trained pipeline's ``vae`` such as the shipped model's); it is loaded
    instead of training the VAE again (the UNet stage is the one worth tuning, and the VAE stage takes a
    fifth of a run).
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from .tiny_model import _sdxl_unet_config, write_tiny_sdxl

    torch.set_num_threads(config.threads)
    out = pathlib.Path(out_dir)
    record = TrainingLog(config=asdict(config))
    write_tiny_sdxl(out, seed=config.seed)  # the architecture, the tokenizers and the text encoders' start
    pipe = StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)
    started = time.perf_counter()
    if vae_from is not None:
        log.info("the VAE stage is taken from %s", vae_from)
        vae = AutoencoderKL.from_pretrained(vae_from, local_files_only=True)
        record.vae_losses = _vae_stage_losses(pathlib.Path(vae_from))
    else:
        vae = train_vae_stage(out / "vae_stage", config, record)
    torch.manual_seed(config.seed + 10)
    unet = UNet2DConditionModel(**{**_sdxl_unet_config(), **TRAINED_UNET})
    pipe.register_modules(unet=unet, vae=vae, scheduler=sampling_scheduler())
    log.info("rendering %d training images (held-out captions excluded)", config.images)
    scenes = _training_scenes_with_coverage(config.images, config.seed + 3)
    means = encode_scenes(pipe.vae, [(image, caption) for image, caption, _ in scenes])
    pixel_weights = None
    if config.unet_object_weight > 0:
        pixel_weights = latent_loss_weights([coverage for _, _, coverage in scenes],
                                            config.size // means.shape[-1], config.unet_object_weight)
    record.scaling_factor = float(1.0 / means.std())
    pipe.vae.register_to_config(scaling_factor=record.scaling_factor)
    log.info("latent std %.4f: scaling factor %.5f", float(means.std()), record.scaling_factor)
    log.info("training the UNet: %d steps of %d", config.unet_steps, config.unet_batch)
    train_unet(pipe, means * record.scaling_factor, [caption for _, caption, _ in scenes], config, record,
               out / "checkpoint", pixel_weights)
    record.seconds["total"] = time.perf_counter() - started
    pipe.save_pretrained(out, safe_serialization=True)
    for weights in out.rglob("*.safetensors"):
        weights.chmod(0o644)
    (out / "training.json").write_text(json.dumps(asdict(record), indent=1))
    draw_loss_curve(record, out / "loss_curve.png")
    log.info("trained model written to %s in %.0f s", out, record.seconds["total"])
    return out


def draw_loss_curve(record: TrainingLog, path: pathlib.Path, width: int = 900, height: int = 360) -> None:
    """Both stages' losses (moving average over 50 steps, log scale) side by side, with Pillow only."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    object_weight = record.config.get("unet_object_weight", 0)
    unet_weighting = f", object pixels x(1 + {object_weight:g} coverage)" if object_weight else ""
    panels = [("VAE reconstruction loss (crops, then whole images object-weighted)", record.vae_losses),
              (f"UNet v-prediction loss (SNR-capped{unet_weighting})", record.unet_losses)]
    panel_width = width // len(panels)
    for i, (title, losses) in enumerate(panels):
        left, top, right, bottom = i * panel_width + 50, 30, (i + 1) * panel_width - 15, height - 40
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, 8), title, fill="black")
        if len(losses) < 2:
            continue
        window = min(50, len(losses))
        smooth = np.convolve(np.log10(np.maximum(losses, 1e-8)), np.ones(window) / window, mode="valid")
        low, high = float(smooth.min()), float(smooth.max())
        span = max(high - low, 1e-6)
        points = [(left + (right - left) * k / max(1, len(smooth) - 1), bottom - (bottom - top) * (v - low) / span)
                  for k, v in enumerate(smooth)]
        draw.line(points, fill=(200, 30, 30), width=2)
        draw.text((4 + i * panel_width, top), f"{10 ** high:.3g}", fill="black")
        draw.text((4 + i * panel_width, bottom - 10), f"{10 ** low:.3g}", fill="black")
        draw.text((left, bottom + 8), f"step 1 .. {len(losses)}", fill="black")
    image.save(path)
