"""Triton model ``denoiser``: conditioning + options -> final latents, on a patch-parallel rank group.

This model instance is rank 0; it starts ranks 1..N-1 as worker processes (one per device), and
serves requests one at a time on the whole group (Triton queues the rest).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..core.denoise import GenerationCancelled
from ..core.devices import resolve_device_kind
from ..core.model import Conditioning, ModelInfo
from ..core.modes import Mode
from ..core.parallel import ParallelConfig
from .rank_service import RankService, RankServiceConfig, warmup_requests
from . import triton_io, validation
from .settings import ServingSettings


class TritonPythonModel:
    def initialize(self, args):
        self.settings = s = ServingSettings.from_model_config(args["model_config"])
        device_kind = resolve_device_kind(s.device)
        if device_kind == "cuda" and torch.cuda.device_count() < s.ranks:
            raise RuntimeError(f"denoiser is configured for {s.ranks} ranks but {torch.cuda.device_count()} GPUs are visible")
        config = RankServiceConfig(
            model=s.model_dir, world_size=s.ranks,
            parallel=ParallelConfig(Mode(s.mode), s.warmup_steps, s.split_cfg),
            device_kind=device_kind, engine=s.engine, engine_dir=s.engine_dir or None,
            python=os.environ.get("DISTRIFUSION_PYTHON") or _python_beside(sys.executable),
            rank_timeout_s=s.rank_timeout_s,
            # every built size, shaped like a default request: no request pays a first call's costs
            warmup=warmup_requests(s.built_sizes, s.default_guidance, s.default_scheduler),
        )
        self.service = RankService(config)
        self.sdxl = ModelInfo.read(s.model_dir).family == "sdxl"
        self.shapes = validation.TensorShapes.read(s.model_dir)  # what this model's text encoder sends
        self._metrics()
        self._restarts_counted = 0

    def _metrics(self):
        labels = {"model": "denoiser"}
        self.metric_families = []  # a family must outlive its metrics

        def metric(name, text, kind):
            family = pb_utils.MetricFamily(name=name, description=text, kind=kind)
            self.metric_families.append(family)
            return family.Metric(labels=labels)

        def counter(name, text):
            return metric(name, text, pb_utils.MetricFamily.COUNTER)

        def gauge(name, text):
            return metric(name, text, pb_utils.MetricFamily.GAUGE)

        self.steps_total = counter("distrifusion_denoise_steps_total", "Denoising steps run by the rank group")
        self.step_seconds_total = counter("distrifusion_denoise_step_seconds_total",
                                          "Rank 0's UNet time summed over all steps (seconds)")
        self.wait_seconds_total = counter("distrifusion_exchange_wait_seconds_total",
                                          "Rank 0's time blocked in patch exchanges (seconds)")
        self.last_step_seconds = gauge("distrifusion_last_request_step_seconds",
                                       "Mean UNet time per step of the last request (seconds)")
        self.last_wait_seconds = gauge("distrifusion_last_request_exchange_wait_seconds",
                                       "Exchange wait of the last request (seconds)")
        self.restarts_total = counter("distrifusion_rank_group_restarts_total",
                                      "Restarts of the rank group (a rank died, hung or failed to start)")

    def execute(self, requests):
        try:
            return triton_io.answer_each(requests, self._denoise)
        finally:
            self._count_restarts()

    def _count_restarts(self) -> None:
        restarts = self.service.restarts
        if restarts > self._restarts_counted:
            self.restarts_total.increment(restarts - self._restarts_counted)
            self._restarts_counted = restarts

    def _denoise(self, request) -> dict[str, np.ndarray]:
        values = {name: triton_io.optional_value(request, name) for name in validation.OPTIONS}
        generation = validation.generation(values, self.settings)
        # every tensor is checked against this deployment before it reaches a rank: a wrong shape sent to
        # the denoiser directly must get 400, not kill a rank worker and restart the group
        given = {name: triton_io.tensor(request, name) for name in ("prompt_embeds", "text_embeds", "time_ids")}
        checked = validation.embeds(given, generation.guided, self.shapes)
        device = self.service.device
        embeds = torch.from_numpy(checked["prompt_embeds"]).to(device)
        added = None
        if self.sdxl:
            added = {k: torch.from_numpy(checked[k]).to(device) for k in ("text_embeds", "time_ids")}
        self.service.ensure_ready()  # a restart after a worker died while idle is not this request's time
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s
        cancelled = getattr(request, "is_cancelled", lambda: False)

        def should_stop() -> bool:
            return cancelled() or time.monotonic() > deadline

        try:
            result = self.service.generate(generation, Conditioning(embeds, added), should_stop=should_stop)
        except GenerationCancelled as stopped:
            why = "cancelled by the client" if cancelled() else f"past its {self.settings.request_timeout_s:g} s timeout"
            pb_utils.Logger.log_warn(f"denoising request {why}: {stopped}")
            raise triton_io.Stopped(f"request {why}: {stopped}") from None
        steps = len(result.unet_seconds)
        self.steps_total.increment(steps)
        self.step_seconds_total.increment(sum(result.unet_seconds))
        self.wait_seconds_total.increment(result.wait_seconds)
        self.last_step_seconds.set(sum(result.unet_seconds) / steps)
        self.last_wait_seconds.set(result.wait_seconds)
        pb_utils.Logger.log_info(f"denoised {generation.height}x{generation.width}, {steps} steps in "
                                 f"{time.perf_counter() - started:.2f} s on {self.service.config.world_size} rank(s)")
        return {"latents": result.latents.float().cpu().numpy()}

    def finalize(self):
        self.service.close()
        triton_io.log_finalized("denoiser")


def _python_beside(executable: str) -> str | None:
    """The stub is not a Python interpreter; workers need one (the venv's, found by the launcher)."""
    return executable if os.path.basename(executable).startswith("python") else None
