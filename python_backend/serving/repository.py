"""Fills a Triton model repository from the packaged templates with one deployment's settings."""

from __future__ import annotations

import importlib.resources
import logging
import shutil
from pathlib import Path

from .settings import ServingSettings

log = logging.getLogger("distrifusion.repository")

# The templates are package data (model_repository/ at the top of the checkout links here).
TEMPLATES = Path(str(importlib.resources.files("python_backend.serving") / "model_repository"))
MODELS = ("text_encoder", "denoiser", "vae_decoder", "postprocess", "pipeline")


def fill_repository(out: Path, settings: ServingSettings) -> Path:
    """Copies the five models into ``out`` and writes ``settings`` into each Python model's config."""
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"model repository templates not found at {TEMPLATES}")
    out.mkdir(parents=True, exist_ok=True)
    parameters = "\n".join(
        f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        for key, value in settings.as_parameters().items()
    )
    for model in MODELS:
        target = out / model
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(TEMPLATES / model, target, ignore=shutil.ignore_patterns("__pycache__"))
        config = target / "config.pbtxt"
        config.write_text(config.read_text().replace("# PARAMETERS", parameters))
    log.info("model repository ready at %s (%d rank(s), %s, sizes %s)", out, settings.ranks, settings.engine,
             settings.sizes)
    return out
