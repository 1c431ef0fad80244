"""Faults through the real tritonserver: per-request timeout, client cancellation, a killed rank.

Timing on a busy 2-core machine: a steady 3-step request takes about half a second here, so the served
TIMEOUT leaves more than 10x; LONG takes minutes, far past TIMEOUT; faults are injected once the rank
worker is seen computing (its CPU time), not after a guessed delay.
"""

import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from python_backend.client import generate
from conftest import rank_workers, tiny_serving_settings, wait_until_busy, wait_until_exited
from python_backend.client.request import request_tensors
from python_backend.serving.repository import serve_repository

pytestmark = pytest.mark.slow

TIMEOUT = 8.0  # the served request timeout (s)
RANK_TIMEOUT = 10.0  # the served rank timeout (s)
LONG = 10_000  # steps (this deployment allows them): many minutes of denoising, far longer than TIMEOUT


@pytest.fixture(scope="module")
def server(tiny_sdxl, tmp_path_factory):
    settings = tiny_serving_settings(tiny_sdxl, default_steps=2, warmup_steps=1, max_steps=LONG,
                                     request_timeout_s=TIMEOUT, rank_timeout_s=RANK_TIMEOUT)
    with serve_repository(settings, tmp_path_factory.mktemp("faults")) as triton:
        yield triton


def _solo(server):
    return generate(server.urls["http"], "a quiet harbour", seed=5, steps=3)


def _timed_solo(server) -> tuple[np.ndarray, float]:
    started = time.monotonic()
    image = _solo(server)
    return image, time.monotonic() - started


def test_a_request_past_its_timeout_stops_and_frees_the_group(server):
    before, steady = _timed_solo(server)
    assert steady < TIMEOUT / 4, f"a steady request took {steady:.1f} s: too slow a machine for TIMEOUT"
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match=f"past its {TIMEOUT:g} s timeout"):
        generate(server.urls["http"], "a long one", steps=LONG)
    # it stops at the first step boundary past the deadline: a step is a small part of a steady request
    assert time.monotonic() - started < TIMEOUT + 5 * steady + 5
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
    (worker,) = rank_workers(server)
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    encoded = client.infer("text_encoder", _grpc_inputs(request_tensors("a cancelled one")))
    conditioning = [(name, encoded.as_numpy(name), "FP32") for name in ("prompt_embeds", "text_embeds", "time_ids")]
    steps = [("steps", np.array([LONG], dtype=np.int64), "INT64")]
    sent = time.monotonic()
    call = client.async_infer("denoiser", _grpc_inputs(conditioning + steps), callback=lambda result, error: None)
    wait_until_busy(worker)  # the cancelled request is denoising
    call.cancel()
    np.testing.assert_array_equal(generate(server.urls["grpc"], "a quiet harbour", protocol="grpc", seed=5, steps=3),
                                  before)
    # The group was free again before the cancelled request's own deadline would have ended it.
    assert time.monotonic() - sent < TIMEOUT
    client.close()
    log = server.log_path.read_text()
    assert "denoising request cancelled by the client" in log, log[-3000:]


def test_a_killed_rank_fails_its_request_and_the_next_one_is_exact(server):
    _solo(server)
    before, steady = _timed_solo(server)
    victims = rank_workers(server)
    assert victims, "the denoiser's rank worker is running"

    def kill_when_denoising():
        wait_until_busy(victims[0])
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_denoising)
    killer.start()
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match="rank group was restarted, retry"):
        generate(server.urls["http"], "a doomed one", steps=LONG)
    killer.join()
    # noticed at once (a dead peer resets its connections); the restart (a new worker process loads the
    # model, and the group warms up) is done before the failed request returns
    assert time.monotonic() - started < RANK_TIMEOUT + 90
    after, seconds = _timed_solo(server)
    np.testing.assert_array_equal(after, before)
    # the new group was loaded and warm before it took this request: no first-request cost
    assert seconds < 3 * steady + 1, f"first request after the restart: {seconds:.2f} s, steady: {steady:.2f} s"
    assert not set(victims) & set(rank_workers(server))


def test_a_rank_killed_between_requests_is_replaced_before_the_next_one_starts_its_clock(server):
    before = _solo(server)
    victims = rank_workers(server)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_until_exited(victims)  # gone before the request is sent (else the request sees it die)
    # The group is restarted (a new worker loads the model, the group warms up: longer than TIMEOUT
    # on a busy machine) before this request's timeout starts: it succeeds, exactly as before.
    np.testing.assert_array_equal(_solo(server), before)
    assert "restarting the rank group: rank worker(s) [1] had exited" in server.log_path.read_text()
    workers = rank_workers(server)
    assert workers and not set(victims) & set(workers)
