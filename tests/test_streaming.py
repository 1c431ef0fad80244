"""The decoupled ``pipeline_stream`` model through the real tritonserver (and its gateway): a message per
step, previews, the ensemble's own final image, bad input, cancellation that frees the rank group, two
streams at once, and the stream's metrics."""

import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import TINY_SIZE as SIZE, ready_answer, rank_workers, tiny_serving_settings
from python_backend.client import StreamCancelled, generate, generate_stream
from python_backend.serving.repository import serve_repository

pytestmark = pytest.mark.slow

LONG = 10_000  # steps: minutes of denoising, only ever cancelled
TIMEOUT = 120.0  # the served request timeout: far longer than any test waits for a cancellation


@pytest.fixture(scope="module")
def server(tiny_sdxl, tmp_path_factory):
    settings = tiny_serving_settings(tiny_sdxl, default_steps=3, warmup_steps=1, max_steps=LONG,
                                     request_timeout_s=TIMEOUT)
    with serve_repository(settings, tmp_path_factory.mktemp("streaming")) as triton:
        yield triton


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


def _solo(server):
    return generate(server.urls["http"], "a quiet harbour", seed=5, steps=3)


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
