"""Faults through the real tritonserver: per-request timeout, client cancellation, a killed rank; and the
streaming model ``pipeline_stream`` on the same server: a message per step, previews, the ensemble's own
final image, bad input, cancellation that frees the rank group, two streams at once, its metrics.

Timing on a busy 2-core machine: a steady 3-step request takes about half a second here, so the served
TIMEOUT leaves more than 10x; LONG takes minutes, far past TIMEOUT; faults are injected once the rank
worker is seen computing (its CPU time), not after a guessed delay.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from python_backend.client import StreamCancelled, generate, generate_stream
from conftest import (FAULTS_LONG, FAULTS_RANK_TIMEOUT, FAULTS_TIMEOUT, TINY_SIZE as SIZE, ready_answer, rank_workers,
                      wait_until_busy, wait_until_exited)
from python_backend.client.request import request_tensors

pytestmark = pytest.mark.slow

TIMEOUT = FAULTS_TIMEOUT  # the served request timeout (s)
RANK_TIMEOUT = FAULTS_RANK_TIMEOUT  # the served rank timeout (s)
LONG = FAULTS_LONG  # steps (this deployment allows them): many minutes of denoising, far longer than TIMEOUT


@pytest.fixture
def server(faults_server):
    return faults_server


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


# --------------------------------------------------------------------------------------------------
# Streaming (pipeline_stream)


def _grpc(server):
    return server.urls["grpc"]


def test_a_stream_reports_every_step_with_previews_and_ends_with_the_ensembles_image(server):
    options = dict(prompt="a red circle at the top left", seed=11, steps=6, guidance_scale=4.0)
    messages = []
    streamed = generate_stream(_grpc(server), preview_every=2, on_step=messages.append, **options)
    assert [m.step for m in messages] == [1, 2, 3, 4, 5, 6]
    assert {m.steps for m in messages} == {6}
    seconds = [m.seconds for m in messages]
    assert seconds == sorted(seconds) and seconds[0] > 0
    waits = [m.exchange_wait_seconds for m in messages]
    assert waits == sorted(waits) and all(w >= 0 for w in waits)
    # previews on steps 2 and 4 (step 6 is the final image), at latent resolution
    assert [m.step for m in messages if m.preview is not None] == [2, 4]
    for message in messages:
        if message.preview is not None:
            assert message.preview.shape == (SIZE // 8, SIZE // 8, 3) and message.preview.dtype == np.uint8
    previews = [m.preview for m in messages if m.preview is not None]
    assert not np.array_equal(previews[0], previews[1])  # the latents moved between them
    # the one-shot ensemble returns the identical image
    np.testing.assert_array_equal(streamed, generate(server.urls["http"], **options))
    # without previews, every step is still reported
    plain = []
    again = generate_stream(_grpc(server), on_step=plain.append, **options)
    assert [m.step for m in plain] == [1, 2, 3, 4, 5, 6] and all(m.preview is None for m in plain)
    np.testing.assert_array_equal(again, streamed)


@pytest.mark.parametrize("value, message", [
    (-1, "input 'preview_every' is -1; allowed: 0 (no previews) to 3 (the steps)"),
    (4, "input 'preview_every' is 4; allowed: 0 (no previews) to 3 (the steps)"),
])
def test_a_bad_preview_every_is_refused_naming_the_range(server, value, message):
    with pytest.raises(InferenceServerException, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate_stream(_grpc(server), "a star", steps=3, preview_every=value)
    assert ready_answer(server.http_port)[0] == 200


def test_bad_inputs_to_the_stream_name_the_field(server):
    with pytest.raises(InferenceServerException, match="input 'steps' is 0; allowed: 1 to"):
        generate_stream(_grpc(server), "a star", steps=0)
    with pytest.raises(InferenceServerException, match="inputs 'height'/'width' are 512x512"):
        generate_stream(_grpc(server), "a star", height=512, width=512)
    with pytest.raises(InferenceServerException, match="input 'prompt' must not be empty"):
        generate_stream(_grpc(server), " ")
    image = generate_stream(_grpc(server), "a star", steps=2)
    assert image.shape == (SIZE, SIZE, 3)


def test_cancelling_a_stream_stops_the_group_at_the_next_step_and_frees_it(server):
    before = _solo(server)
    workers = rank_workers(server)
    steps_seen, stop = [], threading.Event()

    def on_step(message):
        steps_seen.append((message.step, time.monotonic()))
        if message.step == 3:
            stop.set()

    with pytest.raises(StreamCancelled):
        generate_stream(_grpc(server), "a long one", steps=LONG, on_step=on_step, stop=stop)
    cancelled_at = time.monotonic()
    step_time = (steps_seen[-1][1] - steps_seen[0][1]) / max(1, len(steps_seen) - 1)
    started = time.monotonic()
    after = _solo(server)
    first = time.monotonic() - started
    started = time.monotonic()
    _solo(server)
    solo = time.monotonic() - started
    print(f"\nstep {step_time:.3f} s; the first request after the cancellation took {first:.2f} s, "
          f"a solo one {solo:.2f} s")
    # it waited for at most the step that was running, not for the cancelled generation
    assert first - solo < step_time + 5.0, (first, solo, step_time)
    np.testing.assert_array_equal(after, before)
    assert rank_workers(server) == workers  # a cancellation is not a failure: no restart
    assert time.monotonic() - cancelled_at < TIMEOUT  # freed long before the request's own deadline
    log = server.log_path.read_text()
    assert "streaming client cancelled" in log and "denoising request cancelled by the client" in log, log[-3000:]


_VANISHING_CLIENT = """
import sys
from python_backend.client import generate_stream
generate_stream(sys.argv[1], "a long one", steps=int(sys.argv[2]), on_step=lambda m: print(m.step, flush=True))
"""


def test_a_client_killed_mid_stream_frees_the_group(server):
    """A client process that dies with its stream open (no cancel of its own: the connection just
    ends) costs the server no more than a cancellation."""
    before = _solo(server)
    workers = rank_workers(server)
    client = subprocess.Popen([sys.executable, "-c", _VANISHING_CLIENT, _grpc(server), str(LONG)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "1"  # denoising, step 1 reported
        assert client.stdout.readline().strip() == "2"
    finally:
        client.kill()
        client.wait(30)
    started = time.monotonic()
    np.testing.assert_array_equal(_solo(server), before)
    took = time.monotonic() - started
    print(f"\nthe first request after the client died took {took:.2f} s")
    assert took < 30, f"{took:.1f} s: the dead client's generation kept the group"
    assert rank_workers(server) == workers


def test_two_streams_at_once_both_get_their_own_image(server):
    options = [dict(prompt="a blue square", seed=1, steps=3), dict(prompt="a green star", seed=2, steps=4)]
    results, errors = {}, []

    def run(i):
        try:
            results[i] = generate_stream(_grpc(server), **options[i])
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    for i in range(2):
        np.testing.assert_array_equal(results[i], generate(server.urls["http"], **options[i]))


def test_stream_metrics_count_outcomes_and_steps(server):
    def metrics():
        with urllib.request.urlopen(server.urls["metrics"], timeout=30) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("distrifusion_stream_"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    before = metrics()
    generate_stream(_grpc(server), "a metric", steps=2)
    with pytest.raises(InferenceServerException):
        generate_stream(_grpc(server), "a metric", steps=2, preview_every=9)
    after = metrics()
    completed = 'distrifusion_stream_requests_total{model="pipeline_stream",outcome="completed"}'
    refused = 'distrifusion_stream_requests_total{model="pipeline_stream",outcome="refused"}'
    steps = 'distrifusion_stream_step_messages_total{model="pipeline_stream"}'
    assert after[completed] - before.get(completed, 0) == 1
    assert after[refused] - before.get(refused, 0) == 1
    assert after[steps] - before.get(steps, 0) == 2
