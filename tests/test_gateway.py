"""The gateway in front of the real tritonserver (issue 16): request bodies over the deployment's limit
refused before Triton reads them (HTTP and gRPC, every HTTP framing), everything else passed through
unchanged, readiness that turns false when a Python backend stub dies, and ``distrifusion serve``
exiting then so that a supervisor restarts it. The echo model (tests/test_server.py) keeps it cheap;
cancellation of real generations is tested in tests/test_faults.py."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ready_answer
from python_backend.serving import server as srv
from python_backend.serving.gateway import _Message, tag_http_infer_body
from python_backend.serving.signals import (CANCEL_DIR_ENV_VAR, CANCEL_PARAMETER, FAILED, READY, STATUS_DIR_ENV_VAR,
                                            CancelMarkers, cancel_probe, publish_state, state_problems)
from test_server import infer_grpc, infer_http, write_echo_repository

LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-echo")
    server = srv.TritonServer(write_echo_repository(root / "repository"), *srv.free_ports(3), workdir=root / "work",
                              max_request_bytes=LIMIT)
    with server:
        yield server


def _echo_body(text: str) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT", "datatype": "BYTES", "shape": [1], "data": [text]}]}).encode()


def _echoed(response_body: bytes) -> str:
    return json.loads(response_body)["outputs"][0]["data"][0]


def _read_response(sock: socket.socket, buffer: bytes = b"") -> tuple[int, bytes, bytes]:
    """(status, body, what came after it) of one HTTP response read from ``sock``."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"connection closed after {buffer!r}"
        buffer += data
    head, rest = buffer.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ")[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        data = sock.recv(65536)
        assert data, "connection closed mid-body"
        rest += data
    return status, rest[:length], rest[length:]


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return sock


def _head(path: str, length: int | None = None, extra: str = "") -> bytes:
    sized = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{sized}{extra}\r\n"
            ).encode()


def _chunked(body: bytes, size: int = 10000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def _region_sizes(server) -> dict[str, int]:
    """Sizes of the Python backend's /dev/shm regions of this server (they grow to the largest request)."""
    sizes = {}
    for pid in srv.group_members(server.pgid):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            at = line.find("/dev/shm/" + srv.SHM_REGION_PREFIX)
            if at >= 0:
                path = line[at:].removesuffix(" (deleted)")
                sizes[path] = os.stat(path).st_size if os.path.exists(path) else 0
    return sizes


INFER = "/v2/models/echo/infer"


def test_a_body_over_the_limit_is_refused_before_tritonserver_reads_it(echo):
    before = _region_sizes(echo)
    assert before
    big = _echo_body("x" * (2 * LIMIT))
    # Content-Length, the body sent at once (tritonclient's way): read and discarded, then 413
    connection = http.client.HTTPConnection("127.0.0.1", echo.http_port, timeout=60)
    connection.request("POST", INFER, body=big, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    message = json.loads(response.read())["error"]
    assert response.status == 413, message
    assert f"{len(big)} bytes" in message and f"limit of {LIMIT} bytes (max_request_bytes)" in message
    connection.close()
    # Expect: 100-continue (curl's and perf_analyzer's way): refused before the body is sent
    with _connect(echo.http_port) as sock:
        sock.sendall(_head(INFER, len(big), "Expect: 100-continue\r\n"))
        status, body, _ = _read_response(sock)
        assert status == 413 and b"max_request_bytes" in body
    # a chunked body: refused once it passes the limit
    with _connect(echo.http_port) as sock:
        sock.sendall(_head(INFER, None, "Transfer-Encoding: chunked\r\n") + _chunked(big))
        status, body, _ = _read_response(sock)
        assert status == 413 and b"max_request_bytes" in body and b"chunked" in body
    # gRPC: grpcio's own limit, the same number
    with pytest.raises(InferenceServerException, match=f"RESOURCE_EXHAUSTED.*larger than max .* vs. {LIMIT}"):
        infer_grpc(echo.urls["grpc"], "x" * (2 * LIMIT))
    assert _region_sizes(echo) == before  # tritonserver never saw any of them
    assert infer_http(echo.urls["http"], "still here")[0] == b"still here"
    # What the gateway spares it: the same body sent to tritonserver's own port is taken, and the
    # regions grow to hold it (and stay that large)
    direct = http.client.HTTPConnection("127.0.0.1", echo.triton_http_port, timeout=60)
    direct.request("POST", INFER, body=big, headers={"Content-Type": "application/json"})
    assert direct.getresponse().status == 200
    direct.close()
    grown = _region_sizes(echo)
    assert sum(grown.values()) > sum(before.values()) + LIMIT, (before, grown)


def test_a_body_within_the_limit_passes_in_every_framing(echo):
    text = "y" * (LIMIT // 2)
    body = _echo_body(text)
    with _connect(echo.http_port) as sock:
        sock.sendall(_head(INFER, len(body), "Expect: 100-continue\r\n"))
        continued = sock.recv(64)
        assert continued.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), continued
        sock.sendall(body)
        status, answer, _ = _read_response(sock, continued[len(b"HTTP/1.1 100 Continue\r\n\r\n"):])
        assert status == 200 and _echoed(answer) == text
    with _connect(echo.http_port) as sock:
        sock.sendall(_head(INFER, None, "Transfer-Encoding: chunked\r\n") + _chunked(body))
        status, answer, _ = _read_response(sock)
        assert status == 200 and _echoed(answer) == text
    # keep-alive with two pipelined requests: two answers, in order, on one connection
    with _connect(echo.http_port) as sock:
        first, second = _echo_body("first"), _echo_body("second")
        sock.sendall(_head(INFER, len(first)) + first + _head(INFER, len(second)) + second)
        status1, answer1, rest = _read_response(sock)
        status2, answer2, _ = _read_response(sock, rest)
        assert (status1, _echoed(answer1), status2, _echoed(answer2)) == (200, "first", 200, "second")


def _answer(port: int, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_status_codes_headers_and_admin_calls_pass_through(echo):
    """The gateway's answer to each request is tritonserver's own, status and body."""
    calls = [("POST", "/v2/models/nothing/infer", _echo_body("x"), None),
             ("POST", INFER, b"{not json", None),
             ("POST", INFER, _echo_body("x").replace(b'"INPUT"', b'"EVIL"'), None),
             ("POST", INFER, _echo_body("fine"), None),
             ("GET", "/v2/models/echo/config", None, None),
             ("GET", "/v2/logging", None, None),
             ("GET", "/v2/logging", None, echo.admin_headers("http")),
             ("GET", "/v2/health/ready", None, None)]
    seen = set()
    for method, path, body, headers in calls:
        through = _answer(echo.http_port, method, path, body, headers)
        assert through == _answer(echo.triton_http_port, method, path, body, headers), (method, path)
        seen.add(through[0])
    assert seen == {200, 400, 403, 404, 500}
    client = grpcclient.InferenceServerClient(echo.urls["grpc"])
    try:
        assert client.is_server_ready() and client.is_model_ready("echo")
        assert "log_info" in str(client.get_log_settings(headers=echo.admin_headers("grpc")))
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_log_settings()
    finally:
        client.close()


def test_tagged_requests_follow_each_other_on_one_connection(echo, tmp_path):
    """A gateway that tags the echo model's requests (as it does the pipeline's): back-to-back requests
    on one keep-alive connection, each answered, and no cancel marker left behind."""
    from python_backend.serving.gateway import Gateway, Limits

    markers = CancelMarkers(tmp_path / "cancelled")
    http_port, grpc_port = srv.free_ports(2)
    gateway = Gateway("127.0.0.1", http_port, grpc_port, "127.0.0.1", echo.triton_http_port, echo.triton_grpc_port,
                      Limits(LIMIT, 128), markers, cancellable=("echo",)).start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        for i in range(20):
            connection.request("POST", INFER, body=_echo_body(f"request {i}"))
            response = connection.getresponse()
            assert (response.status, _echoed(response.read())) == (200, f"request {i}")
        connection.close()
        with _connect(http_port) as sock:  # pipelined: the second request waits in the buffer, not seen as a close
            first, second = _echo_body("first"), _echo_body("second")
            sock.sendall(_head(INFER, len(first)) + first + _head(INFER, len(second)) + second)
            status1, answer1, rest = _read_response(sock)
            status2, answer2, _ = _read_response(sock, rest)
            assert (status1, _echoed(answer1), status2, _echoed(answer2)) == (200, "first", 200, "second")
        for i in range(5):
            assert infer_grpc(f"127.0.0.1:{grpc_port}", f"grpc {i}")[0] == f"grpc {i}".encode()
        assert markers.marked() == []
    finally:
        gateway.stop()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)




def test_readiness_turns_false_when_a_stub_dies(tmp_path):
    server = srv.TritonServer(write_echo_repository(tmp_path / "repository"), *srv.free_ports(3),
                              workdir=tmp_path / "work")
    with server:
        assert server.health_problems() == [] and ready_answer(server.http_port)[0] == 200
        (stub,) = server.stub_processes()["echo"]
        os.kill(stub, signal.SIGKILL)
        status, body = _wait(lambda: (a := ready_answer(server.http_port))[0] != 200 and a, 30,
                             "readiness stayed 200 after the stub was killed")
        assert status == 503 and "model 'echo': its Python backend stub process has exited" in body, body
        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        try:
            assert not client.is_server_ready()
        finally:
            client.close()
        # what Triton alone would have said: ready
        assert ready_answer(server.triton_http_port)[0] == 200


def test_serve_exits_when_a_stub_dies(tmp_path):
    repository = write_echo_repository(tmp_path / "repository")
    http_port, grpc_port, metrics_port = srv.free_ports(3)
    out = tmp_path / "serve.out"
    with open(out, "wb") as sink:
        serve = subprocess.Popen([sys.executable, "-m", "python_backend.cli", "serve", "--repository", str(repository),
                                  "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                                  "--metrics-port", str(metrics_port), "--workdir", str(tmp_path / "work")],
                                 cwd=srv.PROJECT_ROOT, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait(lambda: "Press Ctrl+C to stop." in out.read_text() or serve.poll() is not None, 180, "serve did not start")
        assert serve.poll() is None, out.read_text()
        assert f"request bodies: at most {srv.DEFAULT_MAX_REQUEST_BYTES} bytes (gateway)" in out.read_text()
        stubs = [pid for pid in srv.group_members(_server_pgid(serve.pid))
                 if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(srv.STUB_NAME.encode())]
        assert len(stubs) == 1, stubs
        os.kill(stubs[0], signal.SIGKILL)
        code = serve.wait(60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    text = out.read_text()
    assert code == 1, text[-3000:]
    assert "the Python backend stub of model(s) ['echo'] died; stopping the server so that it can be restarted" in text


def _server_pgid(serve_pid: int) -> int:
    """The process group of tritonserver, ``serve``'s child (it leads a session of its own)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == serve_pid and int(fields[2]) == int(entry.name):
                return int(entry.name)
    raise AssertionError("no tritonserver child of serve")


# --------------------------------------------------------------------------------------------------
# The pieces, without a server


def test_infer_bodies_are_tagged_in_their_json_part_only():
    binary = np.arange(6, dtype=np.float32).tobytes()
    header = json.dumps({"id": "r1", "inputs": [{"name": "x", "datatype": "FP32", "shape": [6],
                                                 "parameters": {"binary_data_size": len(binary)}}]}).encode()
    message = _Message("POST /v2/models/pipeline/infer HTTP/1.1",
                       [("Inference-Header-Content-Length", str(len(header)))], header + binary)
    tagged = tag_http_infer_body(message, "ab" * 16)
    length = int(message.header("inference-header-content-length"))
    document = json.loads(tagged[:length])
    assert document["parameters"] == {CANCEL_PARAMETER: "ab" * 16} and document["id"] == "r1"
    assert tagged[length:] == binary
    plain = _Message("POST /v2/models/pipeline/infer HTTP/1.1", [], json.dumps({"parameters": {"a": 1}}).encode())
    assert json.loads(tag_http_infer_body(plain, "cd" * 16))["parameters"] == {"a": 1, CANCEL_PARAMETER: "cd" * 16}
    for odd in (b"[1, 2]", b"{not json", json.dumps({"parameters": 3}).encode()):  # left for Triton to refuse
        assert tag_http_infer_body(_Message("POST / HTTP/1.1", [], odd), "ef" * 16) == odd


def test_a_cancel_marker_reaches_only_its_own_request(tmp_path):
    markers = CancelMarkers(tmp_path / "cancelled")
    environ = {CANCEL_DIR_ENV_VAR: str(markers.folder)}
    mine, other = markers.new_key(), markers.new_key()
    probe = cancel_probe(json.dumps({CANCEL_PARAMETER: mine}), environ)
    assert not probe()
    markers.mark(other)
    assert not probe()
    markers.mark(mine)
    assert probe() and cancel_probe({CANCEL_PARAMETER: mine}, environ)()
    markers.clear(mine)
    assert not probe() and markers.marked() == [other]
    (tmp_path / "outside").touch()
    for forged in ("../outside", "", 7, None, "A" * 32):  # never a path outside the folder, never a crash
        assert not cancel_probe({CANCEL_PARAMETER: forged}, environ)()
    assert not cancel_probe("not json", environ)()
    assert not cancel_probe({CANCEL_PARAMETER: mine}, {})()  # no folder: nothing is signalled


def test_step_progress_travels_in_order_with_previews_and_only_where_a_stream_asked(tmp_path):
    from python_backend.serving.signals import PROGRESS_DIR_ENV_VAR, PROGRESS_PARAMETER, ProgressReader, ProgressWriter

    environ = {PROGRESS_DIR_ENV_VAR: str(tmp_path)}
    key = CancelMarkers.new_key()
    assert ProgressWriter.for_request({PROGRESS_PARAMETER: key}, environ) is None  # no stream made its folder
    reader = ProgressReader(tmp_path, key)
    writer = ProgressWriter.for_request(json.dumps({PROGRESS_PARAMETER: key}), environ)
    latents = np.arange(2 * 4 * 3 * 3, dtype=np.float32).reshape(2, 4, 3, 3)
    for step in range(1, 13):  # more steps than one read: none is lost, the order is kept
        writer.write(step, 12, 0.5 * step, latents if step % 5 == 0 else None)
    reports = reader.read() + reader.read()
    assert [r["step"] for r in reports] == list(range(1, 13)) and {r["steps"] for r in reports} == {12}
    assert [r["step"] for r in reports if r["preview"] is not None] == [5, 10]
    np.testing.assert_array_equal(reports[4]["preview"], latents)
    assert reports[2]["wait_seconds"] == 1.5
    reader.close()
    assert not any(tmp_path.iterdir())
    writer.write(13, 13, 0.0)  # a step reported after the stream ended is dropped, not an error
    for forged in ("../x", "A" * 32, 3, None):
        assert ProgressWriter.for_request({PROGRESS_PARAMETER: forged}, environ) is None
    with pytest.raises(ValueError, match="not a progress key"):
        ProgressReader(tmp_path, "../elsewhere")


def test_published_states_read_as_readiness_problems(tmp_path):
    environ = {STATUS_DIR_ENV_VAR: str(tmp_path)}
    me = os.getpid()
    living = {me}
    assert state_problems(tmp_path, lambda pid: pid in living) == []
    publish_state("denoiser", READY, workers=[me], environ=environ)
    assert state_problems(tmp_path, lambda pid: pid in living) == []
    publish_state("denoiser", READY, workers=[me, 999999], environ=environ)
    assert state_problems(tmp_path, lambda pid: pid in living) == [
        "model 'denoiser': rank worker process(es) [999999] exited"]
    publish_state("denoiser", FAILED, "worker 1 could not load the model", environ=environ)
    assert state_problems(tmp_path, lambda pid: pid in living) == [
        "model 'denoiser': rank group failed: worker 1 could not load the model"]
    living.clear()  # the publishing process is gone (the model was unloaded): its word no longer counts
    assert state_problems(tmp_path, lambda pid: pid in living) == []
