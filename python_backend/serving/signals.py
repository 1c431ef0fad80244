"""What the front gateway and the Triton models tell each other through two private folders.

Triton 2.51 passes neither an HTTP client's disconnect nor an ensemble's gRPC cancellation into the
models: the denoiser would run an abandoned generation to its end. The gateway (``gateway.py``), which
holds the client's connection, sees both. For every inference request to a model in
:data:`CANCELLABLE_MODELS` it adds a random key as the request parameter :data:`CANCEL_PARAMETER`
(Triton hands request parameters through the ensemble to every composing model), and when the client
goes away before the answer it creates the file ``<cancel folder>/<key>``: the denoiser looks for it
before it starts a request and at every step boundary (:func:`cancel_probe`).

The other way, the denoiser publishes its rank group's state as ``<status folder>/<model>.json``
(:func:`publish_state`); the server's readiness reads it (:func:`state_problems`): a group that is
(re)starting, failed to start or lost a worker is not ready.

The streaming model ``pipeline_stream`` follows the denoiser's steps through a third folder: it calls the
denoiser with a key as :data:`PROGRESS_PARAMETER` after creating ``<progress folder>/<key>/``, and the
denoiser writes one file per step there (:class:`ProgressWriter`), which the streaming model reads and
removes in order (:class:`ProgressReader`): no step is lost however the two processes are scheduled.
It cancels its denoiser call by marking the same key as a cancel marker.

The folders are named by :data:`CANCEL_DIR_ENV_VAR`, :data:`STATUS_DIR_ENV_VAR` and
:data:`PROGRESS_DIR_ENV_VAR` in the server's environment; all live in the server's private work folder.
Without them nothing is signalled.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Callable

CANCEL_DIR_ENV_VAR = "DISTRIFUSION_CANCEL_DIR"
STATUS_DIR_ENV_VAR = "DISTRIFUSION_STATUS_DIR"
PROGRESS_DIR_ENV_VAR = "DISTRIFUSION_PROGRESS_DIR"
CANCEL_PARAMETER = "distrifusion_cancel_key"
PROGRESS_PARAMETER = "distrifusion_progress_key"
PREVIEW_PARAMETER = "distrifusion_preview_every"
CANCELLABLE_MODELS = ("pipeline", "denoiser")
"""The models whose requests can be abandoned at a cost: the pipeline, and the denoiser called directly."""

READY, STARTING, RESTARTING, FAILED = "ready", "starting", "restarting", "failed"
_KEY = re.compile(r"[0-9a-f]{32}")


# --------------------------------------------------------------------------------------------------
# Cancellation markers


class CancelMarkers:
    """The gateway's side: one key per forwarded request, a marker file once its client has gone."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def new_key() -> str:
        return secrets.token_hex(16)

    def mark(self, key: str) -> None:
        (self.folder / key).touch()

    def clear(self, key: str) -> None:
        (self.folder / key).unlink(missing_ok=True)

    def marked(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir())


def parameters_of(parameters: str | dict | None) -> dict:
    """A request's parameters (the JSON text ``request.parameters()`` returns, or a dict) as a dict."""
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters or "{}")
        except ValueError:
            parameters = {}
    return parameters if isinstance(parameters, dict) else {}


def _valid_key(parameters: dict, name: str) -> str | None:
    key = parameters.get(name)
    return key if isinstance(key, str) and _KEY.fullmatch(key) else None


def cancel_probe(parameters: str | dict | None, environ=os.environ) -> Callable[[], bool]:
    """The model's side: a cheap "has this request's client gone?" for a request's parameters.
    Always False without a valid key or folder."""
    key = _valid_key(parameters_of(parameters), CANCEL_PARAMETER)
    folder = environ.get(CANCEL_DIR_ENV_VAR)
    if not folder or key is None:
        return lambda: False
    marker = Path(folder) / key
    return marker.exists


# --------------------------------------------------------------------------------------------------
# Step progress


class ProgressWriter:
    """The denoiser's side: one file per step into the folder the streaming model made for the request
    (nothing is written when there is none: a direct client's made-up key leads nowhere)."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def for_request(cls, parameters: str | dict | None, environ=os.environ) -> "ProgressWriter | None":
        key = _valid_key(parameters_of(parameters), PROGRESS_PARAMETER)
        root = environ.get(PROGRESS_DIR_ENV_VAR)
        if not root or key is None or not (Path(root) / key).is_dir():
            return None
        return cls(Path(root) / key)

    def write(self, step: int, steps: int, wait_seconds: float, preview=None) -> None:
        """Step ``step`` (1-based) of ``steps`` done; ``preview``: the latents to preview, if any."""
        import numpy as np

        name = f"{step:06d}"
        try:
            if preview is not None:
                np.save(self.folder / f"{name}.tmp.npy", np.asarray(preview, dtype=np.float32))
                (self.folder / f"{name}.tmp.npy").replace(self.folder / f"{name}.npy")
            temporary = self.folder / f"{name}.tmp"
            temporary.write_text(json.dumps({"step": step, "steps": steps, "wait_seconds": wait_seconds,
                                             "preview": preview is not None}))
            temporary.replace(self.folder / f"{name}.json")
        except FileNotFoundError:  # the stream has ended and removed its folder: nobody reads any more
            pass


class ProgressReader:
    """The streaming model's side: makes the request's folder, reads its step files in order, removes it."""

    def __init__(self, root: Path, key: str):
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a progress key: {key!r}")
        self.folder = Path(root) / key
        self.folder.mkdir(mode=0o700)

    def read(self) -> list[dict]:
        """The steps reported since the last call, oldest first; each {"step", "steps", "wait_seconds",
        "preview" (float32 latents or None)}."""
        import numpy as np

        reports = []
        for path in sorted(self.folder.glob("[0-9]*[0-9].json")):
            report = json.loads(path.read_text())
            latents = path.with_suffix(".npy")
            report["preview"] = np.load(latents) if report.get("preview") else None
            latents.unlink(missing_ok=True)
            path.unlink()
            reports.append(report)
        return reports

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Rank group state


def publish_state(model: str, state: str, reason: str = "", workers=(), environ=os.environ) -> None:
    """Writes ``model``'s state (atomically) where the server's readiness reads it, if it reads any."""
    folder = environ.get(STATUS_DIR_ENV_VAR)
    if not folder:
        return
    path = Path(folder) / f"{model}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"state": state, "reason": reason, "workers": list(workers),
                                     "pid": os.getpid()}))
    temporary.replace(path)


def state_problems(folder: Path | None, alive: Callable[[int], bool]) -> list[str]:
    """Why the published states say the deployment is not ready (empty: nothing against it)."""
    if folder is None or not Path(folder).is_dir():
        return []
    problems = []
    for path in sorted(Path(folder).glob("*.json")):
        model = path.stem
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if not alive(int(state.get("pid", 0))):
            continue  # an unloaded model's last word; a dead stub is found by the process check
        if state.get("state") != READY:
            reason = f": {state['reason']}" if state.get("reason") else ""
            problems.append(f"model '{model}': rank group {state.get('state')}{reason}")
            continue
        dead = [pid for pid in state.get("workers", []) if not alive(int(pid))]
        if dead:
            problems.append(f"model '{model}': rank worker process(es) {dead} exited")
    return problems
