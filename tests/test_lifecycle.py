"""Model lifecycle on the real tritonserver: load failure with its reason, unload/reload, SIGTERM."""

import json
import time
import urllib.request

import numpy as np

from python_backend.client import generate
from conftest import rank_workers
from python_backend.serving.repository import fill_repository
from python_backend.serving.server import TritonServer, free_ports
from python_backend.serving.settings import ServingSettings

SIZE = 128


def _post(url: str, body: dict | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text else None
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_model_that_cannot_load_reports_why(tiny_sdxl, tmp_path):
    settings = ServingSettings(model_dir=str(tiny_sdxl), ranks=1, engine="onnxruntime",
                               engine_dir=str(tmp_path / "no-engines-here"), sizes=f"{SIZE}x{SIZE}",
                               default_height=SIZE, default_width=SIZE)
    repository = fill_repository(tmp_path / "repository", settings)
    with TritonServer(repository, *free_ports(3), host="127.0.0.1", workdir=tmp_path / "work",
                      extra_args=["--exit-on-error=false", "--strict-readiness=false"]) as server:
        status, index = _post(f"http://{server.urls['http']}/v2/repository/index")
        assert status == 200
        denoiser = next(m for m in index if m["name"] == "denoiser")
        assert denoiser["state"] == "UNAVAILABLE"
        assert "no complete onnxruntime build" in denoiser["reason"]
        assert next(m for m in index if m["name"] == "text_encoder")["state"] == "READY"


def test_unload_ends_the_workers_and_reload_serves_again(tiny_sdxl, tmp_path):
    settings = ServingSettings(model_dir=str(tiny_sdxl), ranks=2, split_cfg=False, sizes=f"{SIZE}x{SIZE}",
                               default_steps=2, default_height=SIZE, default_width=SIZE)
    repository = fill_repository(tmp_path / "repository", settings)
    with TritonServer(repository, *free_ports(3), host="127.0.0.1", workdir=tmp_path / "work",
                      extra_args=["--model-control-mode=explicit", "--load-model=*"]) as server:
        url = server.urls["http"]
        first = generate(url, "a lantern", seed=3)
        workers = rank_workers(server)
        assert workers
        assert _post(f"http://{url}/v2/repository/models/denoiser/unload")[0] == 200
        deadline = time.monotonic() + 10
        while set(workers) & set(rank_workers(server)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not set(workers) & set(rank_workers(server)), "unloading the denoiser ended its rank workers"
        assert _post(f"http://{url}/v2/repository/models/denoiser/load")[0] == 200
        np.testing.assert_array_equal(generate(url, "a lantern", seed=3), first)
