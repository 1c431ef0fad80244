"""Triton model ``pipeline_stream`` (decoupled): the pipeline as a stream of responses.

For each request it calls the same models as the ``pipeline`` ensemble (BLS: ``text_encoder``, then
``denoiser``, then ``vae_decoder`` where the rank group does not decode, then ``postprocess``), so its
final image is the ensemble's. While the denoiser runs, it follows the rank group's steps through the
progress folder (``signals.ProgressReader``) and sends one response per step: ``event`` "step",
``step``/``steps``, ``seconds`` since the request started, ``exchange_wait_seconds`` (rank 0's time
blocked in patch exchanges so far) and ``image``: empty [0, 0, 3], or on every ``preview_every``-th step
a preview at latent resolution (``core.preview``: a fixed latent-to-RGB map, not the VAE). The last
response has ``event`` "image" and the final image.

A client that cancels the call or closes the stream (Triton's ``is_cancelled``) has its generation
stopped at the next step boundary: the request's key is marked in the cancel folder, which the
denoiser reads at every step. Streams run one at a time; the others wait in the queue.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..core.model import load_vae
from ..core.preview import fit_latent_preview
from . import signals, triton_io, validation
from .settings import ServingSettings, cpu_threads

POLL_S = 0.02
"""How often the stream looks for new steps and for its client's cancellation."""
TEXT_OUTPUTS = ("prompt_embeds", "text_embeds", "time_ids")
FORWARDED = ("prompt", "negative_prompt", *validation.OPTIONS)
"""The request's inputs that the composing models take, as the ensemble maps them."""
_NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


class _CalledModelFailed(Exception):
    """A composing model answered with an error; its message and code go to the client."""

    def __init__(self, model: str, error):
        self.code = error.code() if hasattr(error, "code") else None
        super().__init__(error.message())
        self.model = model


class TritonPythonModel:
    def initialize(self, args):
        self.settings = ServingSettings.from_model_config(args["model_config"])
        cpu_threads(self.settings)
        vae = load_vae(self.settings.model_dir, torch.device("cpu"))
        self.preview = fit_latent_preview(vae)  # a 3 x (C + 1) map: the VAE itself is not kept
        del vae
        progress = os.environ.get(signals.PROGRESS_DIR_ENV_VAR)
        cancel = os.environ.get(signals.CANCEL_DIR_ENV_VAR)
        self.progress_root = Path(progress) if progress else None
        self.markers = signals.CancelMarkers(Path(cancel)) if cancel else None
        self._metrics()

    def _metrics(self):
        self.family = pb_utils.MetricFamily(name="distrifusion_stream_requests_total",
                                            description="Streamed generations by how they ended",
                                            kind=pb_utils.MetricFamily.COUNTER)
        self.ended = {outcome: self.family.Metric(labels={"model": "pipeline_stream", "outcome": outcome})
                      for outcome in ("completed", "cancelled", "refused", "failed")}
        self.steps_family = pb_utils.MetricFamily(name="distrifusion_stream_step_messages_total",
                                                  description="Step messages sent to streaming clients",
                                                  kind=pb_utils.MetricFamily.COUNTER)
        self.steps_sent = self.steps_family.Metric(labels={"model": "pipeline_stream"})

    def execute(self, requests):
        for request in requests:  # one at a time: the rank group runs one generation at a time
            self._stream(request, request.get_response_sender())
        return None

    def finalize(self):
        triton_io.log_finalized("pipeline_stream")

    # ----------------------------------------------------------------------------------------------

    def _stream(self, request, sender) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        started = time.perf_counter()
        try:
            steps = self._generate(request, sender, started)
            self.ended["completed"].increment(1)
            pb_utils.Logger.log_info(f"streamed {steps} steps and the image in {time.perf_counter() - started:.2f} s")
        except validation.InputError as bad:
            self.ended["refused"].increment(1)
            sender.send(triton_io.error(str(bad), pb_utils.TritonError.INVALID_ARG), flags=final)
        except triton_io.Stopped as stopped:
            self.ended["cancelled"].increment(1)
            pb_utils.Logger.log_warn(f"stream stopped: {stopped}")
            sender.send(triton_io.error(str(stopped), getattr(pb_utils.TritonError, "CANCELLED", None)), flags=final)
        except _CalledModelFailed as failed:
            refused = failed.code == pb_utils.TritonError.INVALID_ARG
            self.ended["refused" if refused else "failed"].increment(1)
            sender.send(triton_io.error(str(failed), failed.code), flags=final)
        except Exception as failure:  # the model stays up; the client learns what went wrong
            self.ended["failed"].increment(1)
            pb_utils.Logger.log_error(f"stream failed: {failure!r}")
            sender.send(triton_io.error(f"internal error: {failure}"), flags=final)

    def _generate(self, request, sender, started: float) -> int:
        s = self.settings
        triton_io.check_request_id(request.request_id(), s.max_request_id_chars)
        prompt = validation.text("prompt", triton_io.optional_value(request, "prompt"), s, required=True)
        validation.text("negative_prompt", triton_io.optional_value(request, "negative_prompt"), s, required=False)
        values = {name: triton_io.optional_value(request, name) for name in validation.OPTIONS}
        generation = validation.generation(values, s, prompt)
        preview_every = validation.preview_every(triton_io.optional_value(request, "preview_every"), generation.steps)
        if sender.is_cancelled():
            raise triton_io.Stopped("request cancelled by the client before it started")
        given = {name: triton_io.tensor(request, name) for name in FORWARDED}
        given = {name: array for name, array in given.items() if array is not None}
        text = _call("text_encoder", given, TEXT_OUTPUTS)

        key = signals.CancelMarkers.new_key()
        reader = signals.ProgressReader(self.progress_root, key) if self.progress_root else None
        try:
            decoded = self._denoise(generation, preview_every, {**text, **given}, key, reader, sender, started)
        finally:
            if reader is not None:
                reader.close()
            if self.markers is not None:
                self.markers.clear(key)
        image = _call("postprocess", {"decoded": decoded}, ("image",))["image"]
        self._send(sender, "image", generation.steps, generation.steps, started, self._last_wait, image,
                   pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return generation.steps

    def _denoise(self, generation, preview_every: int, inputs: dict, key: str, reader, sender,
                 started: float) -> np.ndarray:
        """The VAE's image [B, 3, H, W] of the request, streaming a response per step meanwhile."""
        on_ranks = self.settings.decodes_on_ranks
        names = ("prompt_embeds", "text_embeds", "time_ids", *validation.OPTIONS)
        parameters = {signals.CANCEL_PARAMETER: key, signals.PROGRESS_PARAMETER: key,
                      signals.PREVIEW_PARAMETER: preview_every}
        answer: dict = {}

        def run() -> None:
            try:
                answer["outputs"] = _call("denoiser", {n: inputs[n] for n in names if n in inputs},
                                          ("decoded",) if on_ranks else ("latents",), parameters)
            except BaseException as failure:  # re-raised in the stream's thread
                answer["failure"] = failure

        worker = threading.Thread(target=run, name="stream-denoise", daemon=True)
        worker.start()
        self._last_wait, cancelled = 0.0, False
        while worker.is_alive():
            worker.join(POLL_S)
            if reader is not None:
                for report in reader.read():
                    self._send_step(sender, report, started)
            if not cancelled and sender.is_cancelled():
                cancelled = True
                if self.markers is not None:
                    self.markers.mark(key)  # the denoiser stops at its next step boundary
                pb_utils.Logger.log_warn("streaming client cancelled: stopping the rank group at the next step")
        if reader is not None and not cancelled:
            for report in reader.read():
                self._send_step(sender, report, started)
        if cancelled:
            raise triton_io.Stopped("request cancelled by the client")
        if "failure" in answer:
            raise answer["failure"]
        outputs = answer["outputs"]
        if on_ranks:
            return outputs["decoded"]
        return _call("vae_decoder", {"latents": outputs["latents"]}, ("decoded",))["decoded"]

    def _send_step(self, sender, report: dict, started: float) -> None:
        self._last_wait = float(report["wait_seconds"])
        preview = report["preview"]
        image = _NO_IMAGE if preview is None else self.preview.to_rgb(preview)
        self._send(sender, "step", report["step"], report["steps"], started, self._last_wait, image, 0)
        self.steps_sent.increment(1)

    @staticmethod
    def _send(sender, event: str, step: int, steps: int, started: float, wait: float, image: np.ndarray,
              flags: int) -> None:
        outputs = {"event": np.array([event.encode()], dtype=np.object_),
                   "step": np.array([step], dtype=np.int64), "steps": np.array([steps], dtype=np.int64),
                   "seconds": np.array([time.perf_counter() - started], dtype=np.float32),
                   "exchange_wait_seconds": np.array([wait], dtype=np.float32), "image": image}
        sender.send(triton_io.respond(outputs), flags=flags)


def _call(model: str, tensors: dict[str, np.ndarray], outputs, parameters: dict | None = None) -> dict:
    """One BLS request to ``model``; its error raises ``_CalledModelFailed`` with the model's message."""
    request = pb_utils.InferenceRequest(model_name=model, inputs=[pb_utils.Tensor(n, a) for n, a in tensors.items()],
                                        requested_output_names=list(outputs), parameters=parameters or {})
    response = request.exec()
    if response.has_error():
        raise _CalledModelFailed(model, response.error())
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}
