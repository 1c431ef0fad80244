"""The demo's generations: each one a gRPC stream to ``pipeline_stream`` run on a thread, its progress kept
for the page to poll, and a stop that cancels the stream (the server then stops the rank group at the next
step boundary).

No HTTP here (``app.py`` serves this), no torch: only the client library.
"""

from __future__ import annotations

import io
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..client.request import save_png
from ..client.stream import StepMessage, StreamCancelled, generate_stream
from ..core.defaults import SCHEDULERS

MAX_RUNNING = 2  # generations streaming at once (the server runs one stream at a time; the rest wait there)
MAX_KEPT = 16  # finished generations kept for their images; the oldest are forgotten first
MAX_PROMPT_CHARS = 2000


class SettingsError(ValueError):
    """A setting the page sent has the wrong type; the message names the field."""


@dataclass(frozen=True)
class Settings:
    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    preview_every: int = 0

    @classmethod
    def from_json(cls, body) -> "Settings":
        """Types only: the served models check every range and answer with the field and the allowed values."""
        if not isinstance(body, dict):
            raise SettingsError("the request body must be a JSON object")
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise SettingsError(f"unknown field(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingsError("field 'prompt' must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise SettingsError(f"field 'prompt' has {len(prompt)} characters; allowed: at most {MAX_PROMPT_CHARS}")
        values = {"prompt": prompt}
        negative = body.get("negative_prompt")
        if negative not in (None, ""):
            if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
                raise SettingsError(f"field 'negative_prompt' must be a string of at most {MAX_PROMPT_CHARS} "
                                    "characters")
            values["negative_prompt"] = negative
        for name in ("height", "width", "steps", "seed", "preview_every"):
            value = body.get(name)
            if value in (None, ""):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                raise SettingsError(f"field {name!r} must be a whole number, got {value!r}")
            values[name] = int(value)
        guidance = body.get("guidance_scale")
        if guidance not in (None, ""):
            if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not np.isfinite(guidance):
                raise SettingsError(f"field 'guidance_scale' must be a number, got {guidance!r}")
            values["guidance_scale"] = float(guidance)
        scheduler = body.get("scheduler")
        if scheduler not in (None, ""):
            if scheduler not in SCHEDULERS:
                raise SettingsError(f"field 'scheduler' is {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
            values["scheduler"] = scheduler
        if values.get("preview_every", 0) < 0:
            raise SettingsError(f"field 'preview_every' is {values['preview_every']}; allowed: 0 (none) or more")
        return cls(**values)

    def as_request(self) -> dict:
        options = {k: v for k, v in self.__dict__.items() if k not in ("prompt", "preview_every")}
        return dict(prompt=self.prompt, preview_every=self.preview_every or None, **options)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    save_png(image, buffer)
    return buffer.getvalue()


@dataclass
class Job:
    id: str
    settings: Settings
    state: str = "running"  # running -> done | stopped | failed
    step: int = 0
    steps: int | None = None
    seconds: float = 0.0
    exchange_wait_seconds: float = 0.0
    previews: int = 0  # how many previews arrived; the page asks for the latest
    preview_png: bytes | None = None
    image_png: bytes | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "step": self.step, "steps": self.steps,
                "seconds": round(self.seconds, 3), "exchange_wait_seconds": round(self.exchange_wait_seconds, 3),
                "previews": self.previews, "error": self.error,
                "settings": {k: v for k, v in self.settings.__dict__.items() if v is not None}}


class BusyError(RuntimeError):
    """Too many generations are running already."""


class Jobs:
    """Starts, tracks, stops and forgets generations against one Triton gRPC endpoint."""

    def __init__(self, triton_grpc_url: str, timeout: float | None = None):
        self.url = triton_grpc_url
        self.timeout = timeout
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()

    def start(self, settings: Settings) -> Job:
        with self._lock:
            running = [job for job in self._jobs.values() if job.state == "running"]
            if len(running) >= MAX_RUNNING:
                raise BusyError(f"{len(running)} generations are running; at most {MAX_RUNNING} at once")
            job = Job(id=secrets.token_hex(8), settings=settings)
            self._jobs[job.id] = job
            self._forget_oldest_finished()
        threading.Thread(target=self._run, args=(job,), name=f"demo-job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def stop(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None:
            job.stop.set()
        return job

    def stop_all(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.stop.set()

    def _forget_oldest_finished(self) -> None:
        finished = [job for job in self._jobs.values() if job.state != "running"]
        for job in sorted(finished, key=lambda j: j.started)[:max(0, len(self._jobs) - MAX_KEPT)]:
            del self._jobs[job.id]

    def _run(self, job: Job) -> None:
        def on_step(message: StepMessage) -> None:
            job.step, job.steps = message.step, message.steps
            job.seconds, job.exchange_wait_seconds = message.seconds, message.exchange_wait_seconds
            if message.preview is not None:
                job.preview_png = png_bytes(message.preview)
                job.previews += 1

        try:
            image = generate_stream(self.url, on_step=on_step, stop=job.stop, timeout=self.timeout,
                                    **job.settings.as_request())
            job.image_png = png_bytes(image)
            job.seconds = max(job.seconds, time.monotonic() - job.started)
            job.state = "done"
        except StreamCancelled:
            job.state = "stopped"
        except Exception as error:  # the server's message (field and allowed range) goes to the page as it is
            job.error = str(error) or type(error).__name__
            job.state = "failed"
