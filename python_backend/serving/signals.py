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

The folders are named by :data:`CANCEL_DIR_ENV_VAR` and :data:`STATUS_DIR_ENV_VAR` in the server's
environment; both live in the server's private work folder. Without them nothing is signalled.
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
CANCEL_PARAMETER = "distrifusion_cancel_key"
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


def cancel_probe(parameters: str | dict | None, environ=os.environ) -> Callable[[], bool]:
    """The model's side: a cheap "has this request's client gone?" for a request's parameters (the JSON
    text ``request.parameters()`` returns, or a dict). Always False without a valid key or folder."""
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters or "{}")
        except ValueError:
            parameters = {}
    key = (parameters or {}).get(CANCEL_PARAMETER) if isinstance(parameters, dict) else None
    folder = environ.get(CANCEL_DIR_ENV_VAR)
    if not folder or not isinstance(key, str) or not _KEY.fullmatch(key):
        return lambda: False
    marker = Path(folder) / key
    return marker.exists


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
