"""Fills a Triton model repository from the packaged templates with one deployment's settings, and
serves one on a local tritonserver (what the tests and benchmarks start)."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from .server import TritonServer, free_ports
from .settings import ServingSettings

log = logging.getLogger("distrifusion.repository")

# The templates are package data (model_repository/ at the top of the checkout links here).
TEMPLATES = Path(str(importlib.resources.files("python_backend.serving") / "model_repository"))
MODELS = ("text_encoder", "denoiser", "vae_decoder", "postprocess", "pipeline", "pipeline_stream")

# The ensemble's decoding, as the deployment decodes: the rank group itself (patch-parallel VAE), or
# the vae_decoder model on rank 0's latents.
DECODED_OUTPUT = ', { name: "decoded", data_type: TYPE_FP32, dims: [ -1, 3, -1, -1 ] }'
DECODED_BY_DENOISER = 'output_map { key: "decoded" value: "decoded" }'
DECODED_BY_VAE_DECODER = """output_map { key: "latents" value: "latents" }
    },
    {
      model_name: "vae_decoder"
      model_version: -1
      input_map { key: "latents" value: "latents" }
      output_map { key: "decoded" value: "decoded" }"""


def served_models(settings: ServingSettings) -> tuple[str, ...]:
    """The models a repository for ``settings`` holds: no ``vae_decoder`` where the rank group decodes,
    so that no model instance can hold the full-resolution decoder activations."""
    return tuple(m for m in MODELS if not (m == "vae_decoder" and settings.decodes_on_ranks))


def fill_repository(out: Path, settings: ServingSettings) -> Path:
    """Copies the served models into ``out`` and writes ``settings`` into each Python model's config."""
    if not TEMPLATES.is_dir():
        raise FileNotFoundError(f"model repository templates not found at {TEMPLATES}")
    out.mkdir(parents=True, exist_ok=True)
    parameters = "\n".join(
        f'parameters {{ key: "{key}" value: {{ string_value: {pbtxt_string(value)} }} }}'
        for key, value in settings.as_parameters().items()
    )
    queue = queue_policy(settings)
    on_ranks = settings.decodes_on_ranks
    filled = {"# PARAMETERS": parameters, "# QUEUE": queue,
              "# DECODED_OUTPUT": DECODED_OUTPUT if on_ranks else "",
              "# DECODE_STEP": DECODED_BY_DENOISER if on_ranks else DECODED_BY_VAE_DECODER}
    models = served_models(settings)
    for model in MODELS:
        target = out / model
        if target.exists():
            shutil.rmtree(target)
        if model not in models:
            continue
        shutil.copytree(TEMPLATES / model, target, ignore=shutil.ignore_patterns("__pycache__"))
        config = target / "config.pbtxt"
        text = config.read_text()
        for placeholder, value in filled.items():
            text = text.replace(placeholder, value)
        config.write_text(text)
    log.info("model repository ready at %s (%d rank(s), %s, sizes %s; decoding %s)", out, settings.ranks,
             settings.engine, settings.sizes,
             "patch-parallel on the rank group" if on_ranks else "on one device (vae_decoder)")
    return out


def pbtxt_string(value: str) -> str:
    """``value`` as a quoted protobuf text-format string (a model path may hold quotes or backslashes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def queue_policy(settings: ServingSettings) -> str:
    """The bounded queue of a Python model (max_batch_size 0 models take ``dynamic_batching`` in Triton
    2.51: it batches nothing here, but its queue policy bounds the queue). Clients cannot lengthen the
    timeout (``allow_timeout_override: false``)."""
    if settings.max_queue_size <= 0:
        return "# an unbounded queue (max_queue_size 0)"
    timeout_us = max(1, int(round(settings.queue_timeout_s * 1e6)))
    return ("dynamic_batching {\n"
            "  default_queue_policy {\n"
            f"    max_queue_size: {settings.max_queue_size}\n"
            "    timeout_action: REJECT\n"
            f"    default_timeout_microseconds: {timeout_us}\n"
            "    allow_timeout_override: false\n"
            "  }\n"
            "}")


READY_TIMEOUT_S = 300.0  # loading five models and warming the rank group up on a busy 2-core machine


@contextlib.contextmanager
def serve_repository(settings: ServingSettings, workdir: Path, host: str = "127.0.0.1",
                     extra_args: Sequence[str] = (), ready_timeout: float = READY_TIMEOUT_S,
                     **server_options) -> Iterator[TritonServer]:
    """A ready tritonserver on free ports over a repository filled with ``settings`` in ``workdir``
    (``repository/``; the server's log and backends in ``server/``); stopped, with every process it
    started, on leaving (stopping it earlier is fine). ``server_options``: more TritonServer arguments."""
    workdir = Path(workdir)
    repository = fill_repository(workdir / "repository", settings)
    server = TritonServer(repository, *free_ports(3), host=host, workdir=workdir / "server", extra_args=extra_args,
                          **server_options)
    server.start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()
