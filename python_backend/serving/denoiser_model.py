"""Triton model ``denoiser``: conditioning + options -> final latents, on a patch-parallel rank group,
and, where the rank group decodes (``parallel_vae`` with N > 1), the decoded image: every rank decodes
its latent slab, so no process holds the full-resolution decoder activations.

This model instance holds no rank: it starts every rank (one per device, rank 0 included) as a worker
process and supervises them (``RankService``), so a rank that hangs or is torn down by NCCL costs the
request it serves, never the Triton stub. Requests run one at a time on the whole group (Triton
queues the rest).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..core.denoise import GenerationCancelled, GenerationRefused
from ..core.devices import resolve_device_kind
from ..core.model import Conditioning, ModelInfo
from ..core.modes import Mode
from ..core.parallel import ParallelConfig
from .rank_service import RankService, RankServiceConfig, warmup_requests
from . import signals, triton_io, validation
from .settings import ServingSettings, check_denoiser_settings

WATCH_INTERVAL_S = 1.0
"""How often the idle rank group is checked for a dead worker (replaced at once, not by the next request)."""
MAX_RETRY_DELAY_S = 60.0


class TritonPythonModel:
    def initialize(self, args):
        self.settings = s = ServingSettings.from_model_config(args["model_config"])
        device_kind = resolve_device_kind(s.device)
        check_denoiser_settings(s, device_kind)
        if device_kind == "cuda" and torch.cuda.device_count() < s.ranks:
            raise RuntimeError(f"denoiser is configured for {s.ranks} ranks but {torch.cuda.device_count()} GPUs are visible")
        config = RankServiceConfig(
            model=s.model_dir, world_size=s.ranks,
            parallel=ParallelConfig(Mode(s.mode), s.warmup_steps, s.split_cfg, s.exchange_dtype),
            device_kind=device_kind, engine=s.engine, engine_dir=s.engine_dir or None, cuda_graphs=s.cuda_graphs,
            python=os.environ.get("DISTRIFUSION_PYTHON") or _python_beside(sys.executable),
            rank_timeout_s=s.rank_timeout_s, dtype=s.dtype,
            decode=s.decodes_on_ranks, decode_timeout_s=s.request_timeout_s,
            # every built size, shaped like a default request: no request pays a first call's costs
            warmup=warmup_requests(s.built_sizes, s.default_guidance, s.default_scheduler),
        )
        self.service = RankService(config, on_state=self._publish_state)
        self.sdxl = ModelInfo.read(s.model_dir).family == "sdxl"
        self.shapes = validation.TensorShapes.read(s.model_dir)  # what this model's text encoder sends
        self._metrics()
        self._restarts_counted = 0
        self._busy = threading.Lock()  # one request or one repair of the group at a time
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch_group, name="rank-group-watch", daemon=True)
        self._watcher.start()

    @staticmethod
    def _publish_state(state: str, reason: str, workers: list[int]) -> None:
        signals.publish_state("denoiser", state, reason, workers)
        if state != signals.READY:
            pb_utils.Logger.log_warn(f"rank group {state}{': ' + reason if reason else ''}")

    def _watch_group(self) -> None:
        """Replaces a group that lost a worker while idle (or failed to restart) without waiting for a
        request, so that readiness, which says not ready meanwhile, comes back by itself."""
        delay, retry_at = WATCH_INTERVAL_S, 0.0
        while not self._closing.wait(WATCH_INTERVAL_S):
            if time.monotonic() < retry_at:
                continue
            with self._busy:
                if self._closing.is_set() or not self.service.needs_restart():
                    continue
                try:
                    self.service.ensure_ready()
                    delay = WATCH_INTERVAL_S
                except Exception as error:  # published as failed; tried again later
                    pb_utils.Logger.log_error(f"the rank group could not be restarted: {error}; "
                                              f"next try in {delay:.0f} s")
                    retry_at, delay = time.monotonic() + delay, min(2 * delay, MAX_RETRY_DELAY_S)
                self._count_restarts()

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
        with self._busy:
            try:
                return triton_io.answer_each(requests, self._denoise, self.settings.max_request_id_chars)
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
        # host float32 tensors: the denoiser places them on each rank's device in its UNet's dtype
        embeds = torch.from_numpy(checked["prompt_embeds"])
        added = None
        if self.sdxl:
            added = {k: torch.from_numpy(checked[k]) for k in ("text_embeds", "time_ids")}
        # the gateway marks a request whose client disconnected or cancelled; Triton tells only a gRPC
        # cancellation of a request sent to this model itself (is_cancelled)
        parameters = signals.parameters_of(request.parameters())
        client_gone = signals.cancel_probe(parameters)
        preview_every = validation.preview_every(parameters.get(signals.PREVIEW_PARAMETER), generation.steps,
                                                 f"request parameter '{signals.PREVIEW_PARAMETER}'")
        progress = signals.ProgressWriter.for_request(parameters)  # a streaming request follows every step
        is_cancelled = getattr(request, "is_cancelled", lambda: False)

        def cancelled() -> bool:
            return is_cancelled() or client_gone()

        if cancelled():
            pb_utils.Logger.log_warn("denoising request cancelled by the client before it started")
            raise triton_io.Stopped("request cancelled by the client before it started")
        wanted = set(request.requested_output_names()) or {"latents"}
        decode = "decoded" in wanted  # the output exists only where the rank group decodes
        self.service.ensure_ready()  # a restart after a worker died while idle is not this request's time
        started = time.perf_counter()
        deadline = time.monotonic() + self.settings.request_timeout_s

        def should_stop() -> bool:
            return cancelled() or time.monotonic() > deadline

        on_step = None
        if progress is not None:
            def on_step(report):
                progress.write(report.index + 1, generation.steps, report.wait_seconds, report.preview)

        try:
            result = self.service.generate(generation, Conditioning(embeds, added), should_stop=should_stop,
                                           decode=decode, on_step=on_step, preview_every=preview_every)
        except GenerationRefused as refused:  # every rank refused before the first step: the group is intact
            raise validation.InputError(f"this deployment cannot run the request: {refused}") from None
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
        pb_utils.Logger.log_info(f"denoised {generation.height}x{generation.width}, {steps} steps"
                                 f"{' and decoded' if decode else ''} in {time.perf_counter() - started:.2f} s on "
                                 f"{self.service.config.world_size} rank(s)")
        outputs = {"latents": result.latents.float().cpu().numpy()}
        if decode:
            outputs["decoded"] = result.image.numpy()
        return {name: value for name, value in outputs.items() if name in wanted}

    def finalize(self):
        self._closing.set()
        self._watcher.join()
        self.service.close()
        triton_io.log_finalized("denoiser")


def _python_beside(executable: str) -> str | None:
    """The stub is not a Python interpreter; workers need one (the venv's, found by the launcher)."""
    return executable if os.path.basename(executable).startswith("python") else None
