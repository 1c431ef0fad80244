"""Faults through the real tritonserver: per-request timeout, client cancellation, a killed rank."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from python_backend.client import generate
from conftest import rank_workers
from python_backend.client.request import request_tensors
from python_backend.serving.repository import fill_repository
from python_backend.serving.server import TritonServer, free_ports
from python_backend.serving.settings import ServingSettings

SIZE, TIMEOUT = 128, 4.0
LONG = 400  # steps: far longer than TIMEOUT on this machine


@pytest.fixture(scope="module")
def server(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    settings = ServingSettings(model_dir=str(tiny_sdxl), ranks=2, split_cfg=False, sizes=f"{SIZE}x{SIZE}",
                               default_steps=2, default_height=SIZE, default_width=SIZE, warmup_steps=1,
                               request_timeout_s=TIMEOUT, rank_timeout_s=10)
    repository = fill_repository(root / "repository", settings)
    triton = TritonServer(repository, *free_ports(3), host="127.0.0.1", workdir=root / "work").start()
    try:
        triton.wait_ready(240)
        yield triton
    finally:
        triton.stop()


def _solo(server):
    return generate(server.urls["http"], "a quiet harbour", seed=5, steps=3)


def test_a_request_past_its_timeout_stops_and_frees_the_group(server):
    before = _solo(server)
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match=f"past its {TIMEOUT:g} s timeout"):
        generate(server.urls["http"], "a long one", steps=LONG)
    assert time.monotonic() - started < TIMEOUT + 10
    np.testing.assert_array_equal(_solo(server), before)


def _grpc_inputs(named_arrays):
    inputs = []
    for name, array, dtype in named_arrays:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_a_cancelled_request_stops_at_the_next_step(server):
    """Triton 2.51 does not pass an ensemble's cancellation into the step that is running, so this
    cancels a request sent to the denoiser model itself (conditioning from the text_encoder model)."""
    before = _solo(server)
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    encoded = client.infer("text_encoder", _grpc_inputs(request_tensors("a cancelled one")))
    conditioning = [(name, encoded.as_numpy(name), "FP32") for name in ("prompt_embeds", "text_embeds", "time_ids")]
    steps = [("steps", np.array([LONG], dtype=np.int32), "INT32")]
    call = client.async_infer("denoiser", _grpc_inputs(conditioning + steps), callback=lambda result, error: None)
    time.sleep(1.5)
    call.cancel()
    started = time.monotonic()
    # The group is free again well before the cancelled request's own timeout would have ended it.
    np.testing.assert_array_equal(generate(server.urls["grpc"], "a quiet harbour", protocol="grpc", seed=5, steps=3),
                                  before)
    client.close()
    log = server.log_path.read_text()
    assert "denoising request cancelled by the client" in log, log[-3000:]
    assert time.monotonic() - started < TIMEOUT


def test_a_killed_rank_fails_its_request_and_the_next_one_is_exact(server):
    before = _solo(server)
    victims = rank_workers(server)
    assert victims, "the denoiser's rank worker is running"
    killer = threading.Timer(1.5, lambda: [os.kill(pid, signal.SIGKILL) for pid in victims])
    killer.start()
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="rank group was restarted, retry"):
        generate(server.urls["http"], "a doomed one", steps=LONG)
    killer.join()
    assert time.monotonic() - started < 30
    np.testing.assert_array_equal(_solo(server), before)
    assert not set(victims) & set(rank_workers(server))
