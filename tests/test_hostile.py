"""A hostile client against one real served deployment (issue 16): the tiny SDXL model on 2 CPU ranks.

Every request of the mix must be refused with the right status and a message naming the input (or
the restricted API), with the server still ready. After the whole mix: the next pipeline image is
exactly the one before it, no rank worker restarted (the restart metric and the worker pids are
unchanged), and the process group's memory grew by less than 5%. Then the bounded queue: a full
denoiser queue answers 503 "Exceeds maximum queue size" at once.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import TINY_SIZE, group_restarts, rank_workers, tiny_serving_settings, wait_until_busy
from python_backend.client import generate
from python_backend.serving import server as srv
from python_backend.serving.repository import serve_repository

pytestmark = pytest.mark.slow

KEY = "hostile-admin-key-" + uuid.uuid4().hex
LATENT = TINY_SIZE // 8
QUEUE = 2


@pytest.fixture(scope="module")
def server(tiny_sdxl, tmp_path_factory):
    # the single-device vae_decoder is deployed (parallel_vae false) so that its inputs are attacked too;
    # tests/test_served_vae.py attacks the default layout, where the rank group decodes
    settings = tiny_serving_settings(tiny_sdxl, default_steps=2, warmup_steps=1, max_queue_size=QUEUE,
                                     parallel_vae=False)
    with serve_repository(settings, tmp_path_factory.mktemp("hostile"), admin_key=KEY) as triton:
        yield triton


def _image(server) -> np.ndarray:
    return generate(server.urls["http"], "a quiet harbour", seed=7, steps=2)


def group_rss_kib(server) -> int:
    """Resident memory (VmRSS, KiB) summed over the server's process group: tritonserver, the stubs
    and the rank workers. Shared pages (the Python backend's /dev/shm regions, torch's libraries)
    count once per process that touches them."""
    total = 0
    for pid in srv.group_members(server.pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


@pytest.fixture(scope="module")
def baseline(server):
    image = _image(server)
    _image(server)  # a second one: lazily grown buffers are at their steady size
    return {"image": image, "workers": sorted(rank_workers(server)), "restarts": group_restarts(server),
            "rss": group_rss_kib(server)}


def _ready(server) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def _post(server, path: str, body: str | bytes = b"", headers=None) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def _post_chunked(server, path: str, chunks) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    try:
        connection.request("POST", path, body=iter(chunks), encode_chunked=True,
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def _grpc_infer(server, model: str, tensors, request_id: str = "") -> tuple[str, str]:
    return _infer(server, model, tensors, "grpc", request_id)


def _json(name, datatype, data, shape=None):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def _json_infer(server, model: str, inputs: list, raw: dict[str, str] | None = None) -> tuple[int, str]:
    """A JSON inference request; ``raw`` puts literal JSON text (4294967298, NaN) in place of
    ``"@name"`` markers, as a hostile client would write it."""
    body = json.dumps({"inputs": inputs})
    for marker, text in (raw or {}).items():
        body = body.replace(f'"@{marker}"', text)
    return _post(server, f"/v2/models/{model}/infer", body)


def _infer(server, model: str, tensors, protocol: str = "http", request_id: str = ""):
    """A binary-tensor request with tritonclient; (HTTP status as int | gRPC status name, message)."""
    import tritonclient.grpc as grpcclient

    module = httpclient if protocol == "http" else grpcclient
    options = {"network_timeout": 120} if protocol == "http" else {}
    client = module.InferenceServerClient(server.urls[protocol], **options)
    inputs = []
    for name, array, datatype in tensors:
        given = module.InferInput(name, list(array.shape), datatype)
        given.set_data_from_numpy(array)
        inputs.append(given)
    try:
        client.infer(model, inputs, request_id=request_id)
    except InferenceServerException as error:
        if protocol == "http":
            return int(error.status()), error.message()
        return str(error.status()).removeprefix("StatusCode."), error.message()
    finally:
        client.close()
    return (200, "") if protocol == "http" else ("OK", "")


def _binary_infer(server, model: str, tensors) -> tuple[int, str]:
    return _infer(server, model, tensors)


PROMPT = _json("prompt", "BYTES", ["a cat"])
GUIDED = 2  # the tiny deployment's default guidance (5.0) makes the batch guided
EMBEDS = (GUIDED, 77, 64)  # tiny SDXL: 77 tokens, 32 + 32 wide
SCALAR = {"steps": "INT64", "height": "INT64", "width": "INT64", "seed": "INT64", "guidance_scale": "FP32"}


def _embeds(prompt_embeds=EMBEDS, text_embeds=(GUIDED, 32), time_ids=(GUIDED, 6), fill=0.1, extra=()):
    tensors = [(name, np.full(shape, fill if name == "prompt_embeds" else 0.1, np.float32), "FP32")
               for name, shape in (("prompt_embeds", prompt_embeds), ("text_embeds", text_embeds),
                                   ("time_ids", time_ids)) if shape is not None]
    return tensors + list(extra)


def _value(name, raw):
    return _json(name, SCALAR[name], [f"@{name}"]), {name: raw}


# (id, how to send it, expected status, what the message must name)
CASES = []


def case(ident, status, names):
    def add(send):
        CASES.append(pytest.param(send, status, names, id=ident))
        return send
    return add


for ident, name, raw in [
    ("steps-2^32+2", "steps", "4294967298"), ("steps-2^63-1", "steps", "9223372036854775807"),
    ("steps-0", "steps", "0"), ("steps-negative", "steps", "-1"), ("steps-201", "steps", "201"),
    ("height-2^32+128", "height", "4294967424"), ("width-0", "width", "0"), ("seed-negative", "seed", "-5"),
    ("guidance-NaN", "guidance_scale", "NaN"), ("guidance-Infinity", "guidance_scale", "Infinity"),
    ("guidance-1e39-overflows-to-inf", "guidance_scale", "1e39"), ("guidance-huge", "guidance_scale", "3e38"),
]:
    tensor, raw_text = _value(name, raw)
    case(ident, 400, [name])(lambda s, t=tensor, r=raw_text: _json_infer(s, "pipeline", [PROMPT, t], r))

case("steps-int32-dtype", 400, ["steps", "INT64"])(
    lambda s: _json_infer(s, "pipeline", [PROMPT, _json("steps", "INT32", [2])]))
case("steps-two-elements", 400, ["steps"])(
    lambda s: _json_infer(s, "pipeline", [PROMPT, _json("steps", "INT64", [2, 2])]))
case("height-string-dtype", 400, ["height"])(
    lambda s: _json_infer(s, "pipeline", [PROMPT, _json("height", "BYTES", ["128"])]))
case("unknown-input", 400, ["evil"])(
    lambda s: _json_infer(s, "pipeline", [PROMPT, _json("evil", "INT64", [1])]))
case("missing-prompt", 400, ["prompt"])(lambda s: _json_infer(s, "pipeline", [_json("steps", "INT64", [1])]))
case("empty-prompt", 400, ["prompt"])(lambda s: _json_infer(s, "pipeline", [_json("prompt", "BYTES", [""])]))
case("oversized-prompt", 400, ["prompt"])(
    lambda s: _json_infer(s, "pipeline", [_json("prompt", "BYTES", ["x" * 100_000])]))
case("two-prompts", 400, ["prompt"])(lambda s: _json_infer(s, "pipeline", [_json("prompt", "BYTES", ["a", "b"])]))
case("unknown-scheduler", 400, ["scheduler"])(
    lambda s: _json_infer(s, "pipeline", [PROMPT, _json("scheduler", "BYTES", ["../../etc/passwd"])]))

# the denoiser, called directly with conditioning of the wrong shape, dtype or values
case("denoiser-embeds-wrong-width", 400, ["prompt_embeds", "[2, 77, 64]"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(prompt_embeds=(GUIDED, 77, 32))))
case("denoiser-embeds-unguided-batch", 400, ["prompt_embeds", "[2, 77, 64]"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(prompt_embeds=(1, 77, 64))))
case("denoiser-embeds-long", 400, ["prompt_embeds"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(prompt_embeds=(GUIDED, 4096, 64))))
case("denoiser-embeds-NaN", 400, ["prompt_embeds", "finite"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(fill=np.nan)))
case("denoiser-embeds-Inf", 400, ["prompt_embeds", "finite"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(fill=np.inf)))
case("denoiser-text-embeds-shape", 400, ["text_embeds", "[2, 32]"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(text_embeds=(GUIDED, 31))))
case("denoiser-time-ids-shape", 400, ["time_ids", "[2, 6]"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(time_ids=(GUIDED, 7))))
case("denoiser-embeds-fp64", 400, ["prompt_embeds", "FP32"])(
    lambda s: _binary_infer(s, "denoiser", [("prompt_embeds", np.zeros(EMBEDS), "FP64")] + _embeds()[1:]))
case("denoiser-missing-embeds", 400, ["prompt_embeds"])(lambda s: _binary_infer(s, "denoiser", _embeds()[1:]))
case("denoiser-steps-overflow", 400, ["steps"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(extra=[("steps", np.array([2**32 + 2], np.int64), "INT64")])))
case("denoiser-size-not-built", 400, ["height"])(
    lambda s: _binary_infer(s, "denoiser", _embeds(extra=[("height", np.array([2048], np.int64), "INT64"),
                                                          ("width", np.array([2048], np.int64), "INT64")])))

# the VAE decoder: a built size only (finding 3: a 2048^2 decode stalled every request)
for ident, shape, fill in [("vae-2048px-latents", (1, 4, 256, 256), 0.0), ("vae-64px-latents", (1, 4, 8, 8), 0.0),
                           ("vae-batch-2", (2, 4, LATENT, LATENT), 0.0), ("vae-NaN", (1, 4, LATENT, LATENT), np.nan),
                           ("vae-Inf", (1, 4, LATENT, LATENT), -np.inf)]:
    case(ident, 400, ["latents"])(
        lambda s, sh=shape, f=fill: _binary_infer(s, "vae_decoder", [("latents", np.full(sh, f, np.float32), "FP32")]))
case("vae-3-channels", 400, ["latents"])(
    lambda s: _binary_infer(s, "vae_decoder", [("latents", np.zeros((1, 3, LATENT, LATENT), np.float32), "FP32")]))

# postprocess
for ident, shape, fill in [("post-256px", (1, 3, 256, 256), 0.0), ("post-not-square", (1, 3, TINY_SIZE, 64), 0.0),
                           ("post-NaN", (1, 3, TINY_SIZE, TINY_SIZE), np.nan)]:
    case(ident, 400, ["decoded"])(
        lambda s, sh=shape, f=fill: _binary_infer(s, "postprocess", [("decoded", np.full(sh, f, np.float32), "FP32")]))

# bodies over the deployment's limit (finding 2): refused by the gateway before tritonserver reads them
LIMIT = 4 << 20  # the tiny deployment's request_body_limit()
case("post-1024px-over-the-body-limit", 413, ["max_request_bytes"])(
    lambda s: _binary_infer(s, "postprocess", [("decoded", np.zeros((1, 3, 1024, 1024), np.float32), "FP32")]))
case("json-body-over-the-limit", 413, ["max_request_bytes", str(LIMIT)])(
    lambda s: _post(s, "/v2/models/pipeline/infer", b'{"inputs": [' + b" " * (LIMIT + 1) + b"]}"))
case("chunked-body-over-the-limit", 413, ["max_request_bytes", "chunked"])(
    lambda s: _post_chunked(s, "/v2/models/pipeline/infer", [b" " * (1 << 20)] * 5))
case("grpc-message-over-the-limit", "RESOURCE_EXHAUSTED", [str(LIMIT)])(
    lambda s: _grpc_infer(s, "pipeline", [("prompt", np.array([b"x" * (LIMIT + 1)], dtype=np.object_), "BYTES")]))
# request ids are echoed in answers and logs: bounded (each model checks its own)
case("request-id-too-long", 400, ["'id'", "at most 128"])(
    lambda s: _post(s, "/v2/models/pipeline/infer", json.dumps({"id": "i" * 10_000, "inputs": [PROMPT]})))
case("grpc-request-id-too-long", "INVALID_ARGUMENT", ["'id'", "at most 128"])(
    lambda s: _grpc_infer(s, "pipeline", [("prompt", np.array([b"a cat"], dtype=np.object_), "BYTES")], "g" * 129))
case("denoiser-request-id-too-long", 400, ["'id'"])(
    lambda s: _post(s, "/v2/models/denoiser/infer", json.dumps({"id": "i" * 129, "inputs": [
        _json("prompt_embeds", "FP32", [0.1] * 2 * 77 * 64, [2, 77, 64])]})))

# restricted APIs without the key
for ident, path in [("shm-register", "/v2/systemsharedmemory/region/x/register"),
                    ("cuda-shm-status", "/v2/cudasharedmemory/status"), ("logging", "/v2/logging"),
                    ("trace", "/v2/trace/setting"), ("repository-index", "/v2/repository/index"),
                    ("unload-denoiser", "/v2/repository/models/denoiser/unload")]:
    case(f"restricted-{ident}", 403, [srv.ADMIN_HTTP_HEADER])(
        lambda s, p=path: _post(s, p, b'{"key": "/triton_python_backend_shm_region_1", "offset": 0, "byte_size": 64}'))


@pytest.mark.parametrize("send, status, names", CASES)
def test_hostile_request_is_refused_naming_the_input(server, baseline, send, status, names):
    got, message = send(server)
    print(f"\n  -> {got} {message[:200]}")
    assert got == status, message
    for name in names:
        assert name in message, (name, message)
    assert _ready(server)


def test_models_refuse_long_request_ids_sent_to_tritonserver_directly(server, baseline):
    """Every model checks ids too: a local client can reach tritonserver's own loopback port."""
    body = json.dumps({"id": "i" * 129, "inputs": [PROMPT]})
    connection = http.client.HTTPConnection("127.0.0.1", server.triton_http_port, timeout=120)
    try:
        connection.request("POST", "/v2/models/text_encoder/infer", body=body)
        response = connection.getresponse()
        status, message = response.status, response.read().decode()
    finally:
        connection.close()
    assert status == 400 and "request 'id' is 129 characters long; allowed: at most 128" in message, message


def test_after_the_mix_nothing_changed(server, baseline):
    assert len(CASES) >= 30
    np.testing.assert_array_equal(_image(server), baseline["image"])
    assert sorted(rank_workers(server)) == baseline["workers"]
    assert group_restarts(server) == baseline["restarts"] == 0
    grown = group_rss_kib(server) / baseline["rss"] - 1
    print(f"process group RSS: {baseline['rss'] / 1024:.0f} MiB before the mix, grown by {grown:+.2%}")
    assert grown < 0.05


def test_a_full_queue_answers_busy_at_once(server, baseline):
    """One generation runs and QUEUE wait: the next requests are refused at once with 503."""
    worker = rank_workers(server)[0]  # rank 0
    results = []

    def one(steps):
        started = time.monotonic()
        try:
            generate(server.urls["http"], "a queued one", seed=1, steps=steps)
            results.append(("ok", time.monotonic() - started))
        except InferenceServerException as error:
            results.append((f"{error.status()} {error.message()}", time.monotonic() - started))

    long = threading.Thread(target=one, args=(60,))
    long.start()
    wait_until_busy(worker)
    waiting = [threading.Thread(target=one, args=(1,)) for _ in range(QUEUE + 2)]
    for thread in waiting:
        thread.start()
        time.sleep(0.3)  # in order: the first QUEUE fill the queue
    for thread in waiting + [long]:
        thread.join(300)
    refused = [(what, seconds) for what, seconds in results if what != "ok"]
    assert len(refused) == 2, results
    for what, seconds in refused:
        assert what.startswith("503") and "Exceeds maximum queue size" in what, what
        assert seconds < 5
    assert _ready(server)
    np.testing.assert_array_equal(_image(server), baseline["image"])
    assert group_restarts(server) == 0
