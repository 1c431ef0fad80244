"""Model lifecycle on the real tritonserver: load failure with its reason, unload/reload, SIGTERM."""

import json
import time
import urllib.request

import numpy as np
import pytest

from python_backend.client import generate
from conftest import rank_workers, tiny_serving_settings
from python_backend.serving.repository import serve_repository

pytestmark = pytest.mark.slow


def _post(server, path: str, body: dict | None = None) -> tuple[int, object]:
    """POST to the server's HTTP endpoint with its admin key (the repository API is restricted)."""
    request = urllib.request.Request(f"http://{server.urls['http']}{path}", data=json.dumps(body or {}).encode(),
                                     headers=server.admin_headers(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:  # (re)loading starts the rank group
            text = response.read().decode()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_model_that_cannot_load_reports_why(tiny_sdxl, tmp_path):
    settings = tiny_serving_settings(tiny_sdxl, ranks=1, engine="onnxruntime",
                                     engine_dir=str(tmp_path / "no-engines-here"))
    with serve_repository(settings, tmp_path, extra_args=["--exit-on-error=false",
                                                          "--strict-readiness=false"]) as server:
        status, index = _post(server, "/v2/repository/index")
        assert status == 200
        denoiser = next(m for m in index if m["name"] == "denoiser")
        assert denoiser["state"] == "UNAVAILABLE"
        assert "no complete onnxruntime build" in denoiser["reason"]
        assert next(m for m in index if m["name"] == "text_encoder")["state"] == "READY"


def test_unload_ends_the_workers_and_reload_serves_again(tiny_sdxl, tmp_path):
    settings = tiny_serving_settings(tiny_sdxl, default_steps=2)
    with serve_repository(settings, tmp_path, extra_args=["--model-control-mode=explicit",
                                                          "--load-model=*"]) as server:
        url = server.urls["http"]
        first = generate(url, "a lantern", seed=3)
        workers = rank_workers(server)
        assert workers
        assert _post(server, "/v2/repository/models/denoiser/unload")[0] == 200
        deadline = time.monotonic() + 60  # unloading returns first; the workers leave as the model finalizes
        while set(workers) & set(rank_workers(server)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not set(workers) & set(rank_workers(server)), "unloading the denoiser ended its rank workers"
        assert _post(server, "/v2/repository/models/denoiser/load")[0] == 200
        np.testing.assert_array_equal(generate(url, "a lantern", seed=3), first)
