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
from conftest import ready_answer, rank_workers, tiny_serving_settings, wait_until_busy, wait_until_exited
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
    worker = rank_workers(server)[0]  # rank 0
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


def test_a_killed_rank_0_fails_its_request_and_the_next_one_is_exact(server):
    """Rank 0 is a worker like the others: SIGKILL of the process holding it costs the request it was
    serving; the denoiser model stays loaded and replaces the group."""
    _solo(server)
    before, steady = _timed_solo(server)
    workers = rank_workers(server)
    assert len(workers) == 2, "every rank, rank 0 included, is a worker process"
    rank0 = workers[0]

    def kill_when_denoising():
        wait_until_busy(rank0)
        os.kill(rank0, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_denoising)
    killer.start()
    started = time.monotonic()
    with pytest.raises(InferenceServerException, match=r"rank worker\(s\) \[0\] died; the rank group was restarted, retry"):
        generate(server.urls["http"], "a doomed one", steps=LONG)
    killer.join()
    # noticed at once (rank 0's pipe ends); the restart (new worker processes load the model, and the
    # group warms up) is done before the failed request returns
    assert time.monotonic() - started < RANK_TIMEOUT + 90
    assert ready_answer(server.http_port)[0] == 200  # the model stayed loaded
    after, seconds = _timed_solo(server)
    np.testing.assert_array_equal(after, before)
    # the new group was loaded and warm before it took this request: no first-request cost
    assert seconds < 3 * steady + 1, f"first request after the restart: {seconds:.2f} s, steady: {steady:.2f} s"
    assert not set(workers) & set(rank_workers(server))  # the whole group was replaced


def test_a_rank_killed_between_requests_is_replaced_before_the_next_one_starts_its_clock(server):
    before = _solo(server)
    victims = rank_workers(server)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    wait_until_exited(victims)  # gone before the request is sent (else the request sees it die)
    # The group is restarted (new workers load the model, the group warms up: longer than TIMEOUT
    # on a busy machine) before this request's timeout starts: it succeeds, exactly as before.
    np.testing.assert_array_equal(_solo(server), before)
    assert "restarting the rank group: rank worker(s) [0, 1] had exited" in server.log_path.read_text()
    workers = rank_workers(server)
    assert workers and not set(victims) & set(workers)


# --------------------------------------------------------------------------------------------------
# A client that leaves: the gateway marks its request, the denoiser stops it (issue 16)


def _raw_pipeline_request(server, prompt: str, steps: int):
    """An HTTP pipeline request on a raw socket (a client that can vanish at any moment)."""
    import json
    import socket

    body = json.dumps({"inputs": [
        {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]},
        {"name": "steps", "datatype": "INT64", "shape": [1], "data": [steps]}]}).encode()
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=60)
    sock.sendall(b"POST /v2/models/pipeline/infer HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def _log_count(server, text: str) -> int:
    return server.log_path.read_text().count(text)


def _wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, what
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_http_client_that_disconnects_stops_its_generation(server):
    before, steady = _timed_solo(server)
    worker = rank_workers(server)[0]  # rank 0
    stopped = _log_count(server, "denoising request cancelled by the client")
    sock = _raw_pipeline_request(server, "an abandoned one", LONG)
    wait_until_busy(worker)  # it is denoising
    sock.close()
    took = _wait_for(lambda: _log_count(server, "denoising request cancelled by the client") > stopped, TIMEOUT,
                     "the denoiser did not stop the abandoned generation")
    print(f"stopped {took:.2f} s after the client disconnected (a steady 3-step request: {steady:.2f} s)")
    assert took < steady + 5
    after, seconds = _timed_solo(server)
    np.testing.assert_array_equal(after, before)
    assert seconds < 3 * steady + 1  # the group was free at once
    assert not server.gateway.http.markers.marked()  # every marker is cleared once Triton has answered


def test_a_queued_request_whose_client_left_never_starts(server):
    before = _solo(server)
    worker = rank_workers(server)[0]  # rank 0
    never = _log_count(server, "cancelled by the client before it started")
    running = _raw_pipeline_request(server, "the one running", LONG)
    wait_until_busy(worker)
    queued = _raw_pipeline_request(server, "the one waiting", LONG)
    time.sleep(1.0)  # it reaches the denoiser's queue
    queued.close()
    time.sleep(0.5)  # the gateway sees the close and marks it
    running.close()
    _wait_for(lambda: _log_count(server, "cancelled by the client before it started") > never, TIMEOUT,
              "the queued request of a client that left was started")
    np.testing.assert_array_equal(_solo(server), before)


def test_a_cancelled_pipeline_request_over_grpc_stops_at_the_next_step(server):
    """The ensemble's cancellation, which Triton 2.51 does not pass on, reaches the denoiser through
    the gateway's marker."""
    before = _solo(server)
    worker = rank_workers(server)[0]  # rank 0
    stopped = _log_count(server, "denoising request cancelled by the client")
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    call = client.async_infer("pipeline", _grpc_inputs(
        [("prompt", np.array([b"a cancelled one"], dtype=np.object_), "BYTES"),
         ("steps", np.array([LONG], dtype=np.int64), "INT64")]), callback=lambda result, error: None)
    wait_until_busy(worker)
    sent = time.monotonic()
    call.cancel()
    _wait_for(lambda: _log_count(server, "denoising request cancelled by the client") > stopped, TIMEOUT,
              "the cancelled pipeline request went on denoising")
    np.testing.assert_array_equal(generate(server.urls["grpc"], "a quiet harbour", protocol="grpc", seed=5, steps=3),
                                  before)
    assert time.monotonic() - sent < TIMEOUT
    client.close()


def _ready_status(server) -> tuple[int, str]:
    return ready_answer(server.http_port)


def test_readiness_is_false_until_a_lost_rank_is_replaced_without_a_request(server):
    before = _solo(server)
    assert _ready_status(server)[0] == 200
    victims = rank_workers(server)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    # not ready from the moment the worker is gone (a loaded machine takes a moment to end it) until the
    # new group is warm: seen within seconds, long before the repair is done
    answers = []
    _wait_for(lambda: answers.append(_ready_status(server)) or answers[-1][0] == 503, 30,
              f"readiness never said not ready: {answers[-3:]}")
    status, body = answers[-1]
    assert "model 'denoiser'" in body, body
    print(f"readiness while the group is repaired: {body}")
    # the denoiser replaces the group by itself (no request comes), and readiness comes back
    took = _wait_for(lambda: _ready_status(server)[0] == 200, 120, "readiness did not come back")
    print(f"ready again {took:.1f} s after the rank was killed")
    workers = rank_workers(server)
    assert workers and not set(victims) & set(workers)
    np.testing.assert_array_equal(_solo(server), before)
