"""Checks of request inputs before any work starts; each error names the input and what is allowed."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.denoise import GenerationRequest
from .settings import ServingSettings


OPTIONS = ("steps", "guidance_scale", "scheduler", "seed", "height", "width")


class InputError(ValueError):
    """A bad request input; the message is returned to the client as is."""


def text(name: str, raw: bytes | str | None, settings: ServingSettings, required: bool) -> str | None:
    if raw is None:
        if required:
            raise InputError(f"input '{name}' is required: a non-empty UTF-8 string")
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"input '{name}' must be valid UTF-8 text") from None
    if required and not raw.strip():
        raise InputError(f"input '{name}' must not be empty: a non-empty UTF-8 string")
    if len(raw) > settings.max_prompt_chars:
        raise InputError(f"input '{name}' is {len(raw)} characters long; allowed: at most {settings.max_prompt_chars}")
    return raw


def guidance(value: float | None, settings: ServingSettings) -> float:
    value = settings.default_guidance if value is None else float(value)
    if not (math.isfinite(value) and settings.min_guidance <= value <= settings.max_guidance):
        raise InputError(f"input 'guidance_scale' is {value}; allowed: {settings.min_guidance} to {settings.max_guidance}")
    if settings.engine != "torch":
        # segment engines are built for one UNet batch: guided (both CFG halves) or not
        built_guided = settings.default_guidance > 1
        if built_guided and value <= 1:
            raise InputError(f"input 'guidance_scale' is {value}; allowed: above 1 up to {settings.max_guidance} "
                             "(this deployment's engines were built for guided generation, the CFG batch)")
        if not built_guided and value > 1:
            raise InputError(f"input 'guidance_scale' is {value}; allowed: {settings.min_guidance} to 1 "
                             "(this deployment's engines were built for unguided generation)")
    return value


def size(height: int | None, width: int | None, settings: ServingSettings) -> tuple[int, int]:
    height = settings.default_height if height is None else int(height)
    width = settings.default_width if width is None else int(width)
    if (height, width) not in settings.built_sizes:
        allowed = ", ".join(f"{h}x{w}" for h, w in settings.built_sizes)
        raise InputError(f"inputs 'height'/'width' are {height}x{width}; allowed (built) sizes: {allowed}")
    return height, width


def preview_every(value, steps: int, name: str = "input 'preview_every'") -> int:
    """Every how many steps a streamed request gets a preview: 0 (none) to ``steps``."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} is {value!r}; allowed: a whole number from 0 (no previews) to {steps} (the steps)")
    if not 0 <= int(value) <= steps:
        raise InputError(f"{name} is {value}; allowed: 0 (no previews) to {steps} (the steps)")
    return int(value)


def generation(values: dict, settings: ServingSettings, prompt: str = "") -> GenerationRequest:
    """A GenerationRequest from the optional scalar inputs, with the configured defaults."""
    steps = settings.default_steps if values.get("steps") is None else int(values["steps"])
    if not 1 <= steps <= settings.max_steps:
        raise InputError(f"input 'steps' is {steps}; allowed: 1 to {settings.max_steps}")
    scheduler = text("scheduler", values.get("scheduler"), settings, required=False) or settings.default_scheduler
    if scheduler not in settings.schedulers:
        raise InputError(f"input 'scheduler' is {scheduler!r}; allowed: {', '.join(settings.schedulers)}")
    seed = settings.default_seed if values.get("seed") is None else int(values["seed"])
    if not 0 <= seed < 2**63:
        raise InputError(f"input 'seed' is {seed}; allowed: 0 to 2^63-1")
    height, width = size(values.get("height"), values.get("width"), settings)
    return GenerationRequest(prompt=prompt, height=height, width=width, steps=steps,
                             guidance=guidance(values.get("guidance_scale"), settings), scheduler=scheduler,
                             seed=seed)


# --------------------------------------------------------------------------------------------------
# Tensors between the models: each model checks what it is sent against the deployment (issue 16), so
# that a client calling an internal model directly gets 400 naming the input, never a crash or a
# decode of a size nobody built.


@dataclass(frozen=True)
class TensorShapes:
    """What the text encoder, the denoiser and the VAE of one model folder exchange, read from its
    configs without loading weights."""

    tokens: int  # T of prompt_embeds [B, T, D]: the tokenizer's padded length
    embed_dim: int  # D: the UNet's cross-attention width (both text encoders' widths for SDXL)
    text_embeds_dim: int  # SDXL's pooled text embedding width; 1 otherwise (the text encoder sends zeros)
    time_ids_dim: int  # SDXL's 6 size/crop conditioning values; 1 otherwise
    latent_channels: int
    vae_factor: int  # pixels per latent row

    @classmethod
    def read(cls, model_dir: str | os.PathLike) -> "TensorShapes":
        folder = Path(model_dir)

        def config(*parts):
            return json.loads(folder.joinpath(*parts).read_text())

        unet, vae = config("unet", "config.json"), config("vae", "config.json")
        tokens = int(config("tokenizer", "tokenizer_config.json").get("model_max_length") or 77)
        if tokens > 4096:  # tokenizers without a limit say 1e30; CLIP's text encoders take 77
            tokens = int(config("text_encoder", "config.json").get("max_position_embeddings", 77))
        text_embeds_dim = time_ids_dim = 1
        if unet.get("addition_embed_type") == "text_time":  # SDXL
            time_ids_dim = 6
            text_embeds_dim = int(unet["projection_class_embeddings_input_dim"]) - \
                time_ids_dim * int(unet["addition_time_embed_dim"])
        cross = unet["cross_attention_dim"]
        return cls(tokens=tokens, embed_dim=int(cross if isinstance(cross, int) else cross[0]),
                   text_embeds_dim=text_embeds_dim, time_ids_dim=time_ids_dim,
                   latent_channels=int(vae.get("latent_channels", 4)),
                   vae_factor=2 ** (len(vae["block_out_channels"]) - 1))


def tensor(name: str, array: np.ndarray | None, allowed: list[tuple[int, ...]]) -> np.ndarray:
    """``array`` if its shape is one of ``allowed`` and every value is finite, else InputError naming
    ``name`` and the allowed shapes."""
    shapes = " or ".join(str(list(shape)) for shape in allowed)
    if array is None:
        raise InputError(f"input '{name}' is required; allowed shape: {shapes}")
    if tuple(array.shape) not in [tuple(shape) for shape in allowed]:
        raise InputError(f"input '{name}' has shape {list(array.shape)}; allowed shape: {shapes}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"input '{name}' holds NaN or infinite values; allowed: finite numbers")
    return array


def embeds(values: dict[str, np.ndarray | None], guided: bool, shapes: TensorShapes) -> dict[str, np.ndarray]:
    """The denoiser's conditioning inputs, checked: batch 2 when guided (negative and positive), else 1."""
    batch = 2 if guided else 1
    return {
        "prompt_embeds": tensor("prompt_embeds", values.get("prompt_embeds"),
                                [(batch, shapes.tokens, shapes.embed_dim)]),
        "text_embeds": tensor("text_embeds", values.get("text_embeds"), [(batch, shapes.text_embeds_dim)]),
        "time_ids": tensor("time_ids", values.get("time_ids"), [(batch, shapes.time_ids_dim)]),
    }


def latents(array: np.ndarray | None, settings: ServingSettings, shapes: TensorShapes) -> np.ndarray:
    """The VAE decoder's input: [1, C, H/f, W/f] for a built size only."""
    allowed = [(1, shapes.latent_channels, h // shapes.vae_factor, w // shapes.vae_factor)
               for h, w in settings.built_sizes]
    return tensor("latents", array, allowed)


def decoded(array: np.ndarray | None, settings: ServingSettings) -> np.ndarray:
    """The postprocess model's input: the VAE's image [1, 3, H, W] for a built size only."""
    return tensor("decoded", array, [(1, 3, h, w) for h, w in settings.built_sizes])
