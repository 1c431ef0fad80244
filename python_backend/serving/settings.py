"""What a served pipeline allows and assumes: read from a Triton model config's parameters.

``distrifusion build --repository`` writes the same values into every model of the repository, so
the text encoder and the denoiser agree on defaults (guidance decides whether the batch is guided).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from ..model import SCHEDULERS


@dataclass(frozen=True)
class ServingSettings:
    model_dir: str = ""
    ranks: int = 1
    mode: str = "corrected_async_gn"
    warmup_steps: int = 4
    split_cfg: bool = True
    engine: str = "torch"
    engine_dir: str = ""
    device: str = "auto"
    sizes: str = "512x512"  # the built sizes, "HxW,HxW"
    default_steps: int = 20
    default_guidance: float = 5.0
    default_scheduler: str = "euler"
    default_seed: int = 0
    default_height: int = 512
    default_width: int = 512
    max_steps: int = 1000
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    request_timeout_s: float = 600.0  # a request still denoising after this long stops at the next step
    rank_timeout_s: float = 60.0  # a rank silent this long (dead or hung) fails the request; the group restarts

    @classmethod
    def from_model_config(cls, model_config: str | dict) -> "ServingSettings":
        config = json.loads(model_config) if isinstance(model_config, str) else model_config
        raw = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        values = {}
        for f in fields(cls):
            if f.name in raw and raw[f.name] is not None:
                values[f.name] = _parse(f.type, raw[f.name])
        return cls(**values)

    def as_parameters(self) -> dict[str, str]:
        return {f.name: _format(getattr(self, f.name)) for f in fields(self)}

    @property
    def built_sizes(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in size.split("x")) for size in self.sizes.split(",") if size]

    @property
    def schedulers(self) -> tuple[str, ...]:
        return SCHEDULERS


def cpu_threads(settings: ServingSettings) -> None:
    """CPU threads per process: cores / ranks, as ``distrifusion generate`` uses, so that the served
    image equals the command line's bit for bit (the thread count changes float summation order)."""
    import os

    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.ranks))


def _parse(kind: str, text: str):
    if kind == "bool":
        return text.strip().lower() in ("1", "true", "yes")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
