"""Loading a local diffusers folder (SDXL or SD 1.x/2.x), its schedulers and its prompt encoding.

Prompt encoding, initial noise and the step arguments are diffusers' own pipeline methods, so the
denoising loop sees exactly what ``StableDiffusionXLPipeline.__call__`` would.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .defaults import SCHEDULERS

log = logging.getLogger("distrifusion.model")


def unet_downsampling_factor(unet_config) -> int:
    """Latent rows per patch unit: the UNet's total downsampling (one per block after the first)."""
    channels = unet_config["block_out_channels"] if isinstance(unet_config, dict) else unet_config.block_out_channels
    return 2 ** (len(channels) - 1)


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent row, as diffusers' pipelines compute ``vae_scale_factor``."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


class ModelFolderError(ValueError):
    """The --model folder is not a diffusers pipeline folder; the message says what is missing."""


@dataclass(frozen=True)
class ModelInfo:
    """What can be read from a model folder's configs without loading weights."""

    path: Path
    family: str  # "sdxl" or "sd"
    downsampling_factor: int  # latent rows per patch unit
    vae_scale: int  # pixels per latent row
    latent_channels: int = 4

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ModelInfo":
        path = Path(path)
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelFolderError(f"no diffusers model folder at {path} (model_index.json missing)")
        pipeline_class = json.loads(index.read_text()).get("_class_name", "")
        unet_config = json.loads((path / "unet" / "config.json").read_text())
        vae_config = json.loads((path / "vae" / "config.json").read_text())
        family = "sdxl" if "XL" in pipeline_class else "sd"
        return cls(
            path=path,
            family=family,
            downsampling_factor=unet_downsampling_factor(unet_config),
            vae_scale=vae_scale_factor(vae_config),
            latent_channels=vae_config.get("latent_channels", 4),
        )


UNET_ONLY_SKIPS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "safety_checker",
                   "feature_extractor", "image_encoder")
"""What a rank that is handed its conditioning does not load (``load_pipeline(unet_only=True)``)."""


def load_pipeline(path: str | os.PathLike, device: torch.device, dtype: torch.dtype = torch.float32,
                  unet_only: bool = False):
    """Loads the folder's diffusers pipeline from local files only. ``unet_only``: the UNet and the
    scheduler, without text encoders or VAE (a served rank: the text encoder and VAE models run those)."""
    from diffusers import DiffusionPipeline

    info = ModelInfo.read(path)
    skipped = {}
    if unet_only:
        present = json.loads((info.path / "model_index.json").read_text())
        skipped = {name: None for name in UNET_ONLY_SKIPS if name in present}
    log.info("loading %s pipeline%s from %s onto %s (%s)", info.family, " (UNet only)" if unet_only else "",
             info.path, device, dtype)
    pipe = DiffusionPipeline.from_pretrained(str(info.path), dtype=dtype, local_files_only=True, **skipped)
    pipe.vae_scale_factor = info.vae_scale  # also without the VAE (diffusers would assume 8)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_scheduler(name: str, config):
    """A fresh scheduler of the named kind built from the model's scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    if name == "ddim":
        # Latents are never clipped: DDIM's default clip_sample=True (meant for pixel-space models) applies
        # where a model's scheduler config does not say, e.g. an Euler config such as the embedded model's.
        return DDIMScheduler.from_config(config, clip_sample=False)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler-a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp-2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")


@dataclass
class Conditioning:
    """Text conditioning of one UNet call; with guidance the unconditional half comes first."""

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict | None  # SDXL's pooled text embeds and size/crop time ids

    def half(self, which: int) -> "Conditioning":
        """The unconditional (0) or conditional (1) half of a guided batch."""
        def pick(t):
            return t.chunk(2)[which]

        added = None if self.added_cond_kwargs is None else {k: pick(v) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(pick(self.prompt_embeds), added)


def encode_prompt(
    pipe, prompt: str | list[str], negative_prompt: str | None, num_images: int, guided: bool, height: int,
    width: int,
) -> Conditioning:
    """Prompt embeddings exactly as diffusers' pipeline builds them for ``__call__`` (a list of prompts:
    one image per prompt and ``num_images``, unconditional halves first when guided)."""
    device = pipe._execution_device
    if hasattr(pipe, "text_encoder_2"):
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images,
            do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt,
        )
        # original size + crop top-left + target size, as diffusers' _get_add_time_ids lays them out
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype)
        if guided:
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
        time_ids = time_ids.to(device).repeat(embeds.shape[0], 1)  # the same for every image of the batch
        return Conditioning(embeds.to(device), {"text_embeds": pooled.to(device), "time_ids": time_ids})
    embeds, negative = pipe.encode_prompt(
        prompt, device, num_images, guided, negative_prompt=negative_prompt
    )
    if guided:
        embeds = torch.cat([negative, embeds])
    return Conditioning(embeds, None)


def load_vae(path: str | os.PathLike, device: torch.device):
    """The model folder's VAE alone, float32 on ``device``: what a decoding process (the ``vae_decoder``
    model, a served rank that decodes its slab) loads, and what both decode in."""
    from diffusers import AutoencoderKL

    info = ModelInfo.read(path)
    return AutoencoderKL.from_pretrained(str(info.path / "vae"), local_files_only=True).to(device).eval()


def decoding_vae(vae):
    """``vae`` fit to decode: upcast to float32 when its config asks (``force_upcast``, as the SDXL VAE
    does: in float16 its last up blocks overflow), as diffusers' pipelines do before decoding."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return vae.to(torch.float32)
    return vae


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's image [B, 3, H, W] in [-1, 1] from final latents, as diffusers' pipelines decode."""
    latents = unscale_latents(vae, latents.to(vae.device, vae.dtype))
    with torch.no_grad():
        return vae.decode(latents, return_dict=False)[0]


def unscale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The denoiser's latents in the VAE's own scale (diffusers' pipelines: std/scaling, then the mean)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return latents * std / vae.config.scaling_factor + mean
    return latents / vae.config.scaling_factor


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's own latents in the denoiser's scale: the inverse of :func:`unscale_latents`."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) * vae.config.scaling_factor / std
    return latents * vae.config.scaling_factor


def to_uint8(image: torch.Tensor):
    """uint8 [B, H, W, 3] from a VAE image, exactly as diffusers' image processor makes PIL images."""
    from diffusers.image_processor import VaeImageProcessor

    array = VaeImageProcessor().postprocess(image.float(), output_type="np")
    return (array * 255).round().astype("uint8")


def decode_latents(pipe, latents: torch.Tensor):
    """uint8 images [B, H, W, 3] from final latents (the pipeline's VAE and post-processing)."""
    return to_uint8(vae_decode(pipe.vae, latents))
