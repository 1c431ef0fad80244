"""Checks of request inputs before any work starts; each error names the input and what is allowed."""

from __future__ import annotations

import math

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
    return value


def size(height: int | None, width: int | None, settings: ServingSettings) -> tuple[int, int]:
    height = settings.default_height if height is None else int(height)
    width = settings.default_width if width is None else int(width)
    if (height, width) not in settings.built_sizes:
        allowed = ", ".join(f"{h}x{w}" for h, w in settings.built_sizes)
        raise InputError(f"inputs 'height'/'width' are {height}x{width}; allowed (built) sizes: {allowed}")
    return height, width


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
