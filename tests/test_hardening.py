"""Hardening of the served stack (issue 16), against the real tritonserver: the admin APIs restricted
by a key, the Python backend's shared memory private to the server's user, every listener of the
process tree on loopback, a clean stop with a client still connected, and the regions of a crashed
run removed at the next start.

The echo model (tests/test_server.py) serves the server-level checks cheaply; one tiny-SDXL deployment
with two CPU ranks, started with ``distrifusion serve``, serves the deployment-level ones (slow).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import broken_repository, TINY_RANKS, tiny_serving_settings
from python_backend.core.ranks import LocalRendezvous
from python_backend.serving import server as srv
from python_backend.serving import shared_memory
from test_server import infer_grpc, infer_http, write_echo_repository

KEY = "test-admin-key-" + uuid.uuid4().hex
HTTP_HEADER = {srv.ADMIN_HTTP_HEADER: KEY}
GRPC_HEADER = {srv.ADMIN_GRPC_HEADER: KEY}
RESTRICTED_HTTP = f"This API is restricted, expecting header '{srv.ADMIN_HTTP_HEADER}'"
RESTRICTED_GRPC = f"This protocol is restricted, expecting header '{srv.ADMIN_GRPC_HEADER}'"
CLEAN_STOP_S = 10.0


# --------------------------------------------------------------------------------------------------
# What a process tree holds, read from /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, ...


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def process_tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if alive(pid):
            tree.append(pid)
            todo.extend(children.get(pid, []))
    return tree


def _socket_inodes(pids) -> dict[int, int]:
    inodes = {}
    for pid in pids:
        try:
            fds = list(os.scandir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd.path)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[int(target[8:-1])] = pid
    return inodes


def _address(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[::-1])
    return socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes ``pids`` hold."""
    inodes = _socket_inodes(pids)
    found = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path(f"/proc/{pids[0]}/net/{name}").read_text().splitlines()[1:]
        for line in table:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((inodes[int(fields[9])], _address(address, family), int(port, 16)))
    return found


def is_loopback_address(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or address.startswith("127.")


def shm_files(pids) -> set[str]:
    """Files under /dev/shm that the processes ``pids`` map or hold open (and that still have a name)."""
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    at = line.find("/dev/shm/")
                    if at >= 0 and not line.rstrip().endswith("(deleted)"):
                        found.add(line[at:].rstrip("\n"))
            for fd in os.scandir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith("/dev/shm/") and not target.endswith("(deleted)"):
                    found.add(target)
        except OSError:
            continue
    return found


def modes(paths) -> dict[str, str]:
    result = {}
    for path in paths:
        try:
            result[path] = oct(stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            continue
    return result


# --------------------------------------------------------------------------------------------------
# Raw HTTP calls


def call(port: int, method: str, path: str, body=None, headers=None, timeout: float = 30) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_model_ready(port: int, model: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while call(port, "GET", f"/v2/models/{model}/ready")[0] != 200:
        assert time.monotonic() < deadline, f"{model} not ready after {timeout:g} s"
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
# Without a server


def test_admin_key_comes_from_the_caller_a_file_the_environment_or_chance(tmp_path):
    assert srv.resolve_admin_key(KEY, environ={}) == (KEY, "given")
    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    assert srv.resolve_admin_key(key_file=key_file, environ={srv.ADMIN_KEY_ENV_VAR: "x" * 20}) == \
        (KEY, f"file {key_file}")
    assert srv.resolve_admin_key(environ={srv.ADMIN_KEY_ENV_VAR: "y" * 20}) == \
        ("y" * 20, f"${srv.ADMIN_KEY_ENV_VAR}")
    first, source = srv.resolve_admin_key(environ={})
    assert source == "random" and len(first) >= 32 and first != srv.resolve_admin_key(environ={})[0]
    for bad in ("short", "has a space in it!!", "semi:colon=0123456789", ""):
        with pytest.raises(ValueError, match="16 to 256 characters"):
            srv.resolve_admin_key(bad)


def test_the_command_listens_on_loopback_restricts_the_admin_apis_and_controls_models(tmp_path):
    server = srv.TritonServer(tmp_path, 1, 2, 3, admin_key=KEY)
    command = server.command(tmp_path / "backends")
    for option in ("--http-address", "--grpc-address", "--metrics-address"):
        assert f"{option}=127.0.0.1" in command
    apis = "shared-memory,logging,trace,model-repository"
    assert f"--http-restricted-api={apis}:{srv.ADMIN_KEY_NAME}={KEY}" in command
    assert f"--grpc-restricted-protocol={apis}:{srv.ADMIN_KEY_NAME}={KEY}" in command
    assert "--model-control-mode=explicit" in command and "--load-model=*" in command
    assert f"--exit-timeout-secs={srv.DEFAULT_EXIT_TIMEOUT_S}" in command
    opened = srv.TritonServer(tmp_path, 1, 2, 3, admin_key=KEY, restricted_apis=["model-repository"])
    assert f"--http-restricted-api=model-repository:{srv.ADMIN_KEY_NAME}={KEY}" in opened.command(tmp_path)
    assert not any("restricted" in arg for arg in srv.TritonServer(tmp_path, restricted_apis=()).command(tmp_path))
    assert srv.is_loopback("127.0.0.1") and srv.is_loopback("::1") and srv.is_loopback("localhost")
    assert not srv.is_loopback("0.0.0.0") and not srv.is_loopback("::") and not srv.is_loopback("10.1.2.3")


def test_serve_listens_on_loopback_unless_told(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    srv.add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--repository", str(tmp_path)])
    assert args.host == "127.0.0.1" and args.admin_key_file is None and args.open_api == []


def test_local_rendezvous_is_private_and_removed_by_its_creator_only():
    rendezvous = LocalRendezvous.create()
    folder = Path(rendezvous.folder)
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert rendezvous.init_method == f"file://{folder / 'store'}"
        LocalRendezvous(rendezvous.folder, owner=os.getpid() + 1).remove()  # a rank that did not create it
        assert folder.is_dir()
        rendezvous.remove()
        assert not folder.exists()
    finally:
        rendezvous.remove()


def test_serve_on_all_interfaces_warns(tmp_path):
    repository = broken_repository(tmp_path)
    http, grpc, metrics = srv.free_ports(3)
    done = subprocess.run([sys.executable, "-m", "python_backend.cli", "serve", "--repository", str(repository),
                           "--host", "0.0.0.0", "--http-port", str(http), "--grpc-port", str(grpc),
                           "--metrics-port", str(metrics), "--workdir", str(tmp_path / "work")],
                          cwd=srv.PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # the broken model: nothing is served
    assert "listening on 0.0.0.0: the HTTP, gRPC and metrics endpoints are reachable from other hosts" in done.stderr


# --------------------------------------------------------------------------------------------------
# The echo model on a restricted server


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening-echo")
    repository = write_echo_repository(root / "repository")
    server = srv.TritonServer(repository, *srv.free_ports(3), workdir=root / "work", admin_key=KEY)  # default host
    server.start()
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


def _system_region(size: int = 64):
    name = f"/hardening-{uuid.uuid4().hex}"
    fd = os.open(f"/dev/shm{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    os.close(fd)
    return name


RESTRICTED_CALLS = [
    ("POST", "/v2/systemsharedmemory/region/probe/register", {"key": "/probe", "offset": 0, "byte_size": 64}),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/unregister", {}),
    ("POST", "/v2/cudasharedmemory/region/probe/register", {"raw_handle": {"b64": "AAAA"}, "device_id": 0,
                                                            "byte_size": 64}),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", {"log_info": False}),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
    ("POST", "/v2/repository/index", {}),
    ("POST", "/v2/repository/models/echo/unload", {}),
    ("POST", "/v2/repository/models/echo/load", {}),
]


def test_http_admin_apis_are_refused_without_the_key(echo):
    for method, path, body in RESTRICTED_CALLS:
        for headers in (None, {srv.ADMIN_HTTP_HEADER: "wrong-key-0123456789"}, {"admin-key": KEY}):
            assert call(echo.http_port, method, path, body, headers) == (403, json.dumps({"error": RESTRICTED_HTTP},
                                                                                         separators=(",", ":"))), \
                (method, path, headers)
    assert call(echo.http_port, "GET", "/v2/logging", headers=HTTP_HEADER)[1].count('"log_info":true') == 1
    assert infer_http(echo.urls["http"], "still served")[0] == b"still served"


def test_http_admin_apis_answer_with_the_key(echo):
    port = echo.http_port
    region = _system_region()
    try:
        register = {"key": region, "offset": 0, "byte_size": 64}
        assert call(port, "POST", "/v2/systemsharedmemory/region/mine/register", register, HTTP_HEADER)[0] == 200
        status, body = call(port, "GET", "/v2/systemsharedmemory/status", headers=HTTP_HEADER)
        assert status == 200 and region in body
        assert call(port, "POST", "/v2/systemsharedmemory/region/mine/unregister", {}, HTTP_HEADER)[0] == 200
    finally:
        os.unlink(f"/dev/shm{region}")
    # CUDA shared memory gets past the restriction (this build or machine may not support it)
    cuda = call(port, "POST", "/v2/cudasharedmemory/region/c/register",
                {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}, HTTP_HEADER)
    assert cuda[0] != 403 and "restricted" not in cuda[1]
    status, body = call(port, "GET", "/v2/logging", headers=HTTP_HEADER)
    assert status == 200 and json.loads(body)["log_info"] is True
    assert call(port, "POST", "/v2/logging", {"log_info": True}, HTTP_HEADER)[0] == 200
    assert call(port, "GET", "/v2/trace/setting", headers=HTTP_HEADER)[0] == 200
    assert call(port, "POST", "/v2/trace/setting", {}, HTTP_HEADER)[0] == 200
    status, body = call(port, "POST", "/v2/repository/index", {}, HTTP_HEADER)
    assert status == 200 and json.loads(body) == [{"name": "echo", "version": "1", "state": "READY"}]
    assert call(port, "POST", "/v2/repository/models/echo/unload", {}, HTTP_HEADER)[0] == 200
    assert call(port, "POST", "/v2/repository/models/echo/load", {}, HTTP_HEADER)[0] == 200
    wait_model_ready(port, "echo")
    assert infer_http(echo.urls["http"], "reloaded")[0] == b"reloaded"


def _grpc_calls(client, headers):
    return [
        ("register_system_shared_memory", lambda: client.register_system_shared_memory("probe", "/probe", 64,
                                                                                        headers=headers)),
        ("get_system_shared_memory_status", lambda: client.get_system_shared_memory_status(headers=headers)),
        ("register_cuda_shared_memory", lambda: client.register_cuda_shared_memory("probe", b"AAAA", 0, 64,
                                                                                    headers=headers)),
        ("get_log_settings", lambda: client.get_log_settings(headers=headers)),
        ("update_log_settings", lambda: client.update_log_settings({"log_info": True}, headers=headers)),
        ("get_trace_settings", lambda: client.get_trace_settings(headers=headers)),
        ("update_trace_settings", lambda: client.update_trace_settings(settings={}, headers=headers)),
        ("get_model_repository_index", lambda: client.get_model_repository_index(headers=headers)),
        ("unload_model", lambda: client.unload_model("echo", headers=headers)),
        ("load_model", lambda: client.load_model("echo", headers=headers)),
    ]


def test_grpc_admin_apis_are_refused_without_the_key(echo):
    client = grpcclient.InferenceServerClient(echo.urls["grpc"])
    try:
        for headers in (None, {srv.ADMIN_GRPC_HEADER: "wrong-key-0123456789"}, {srv.ADMIN_KEY_NAME: KEY}):
            for name, method in _grpc_calls(client, headers):
                with pytest.raises(InferenceServerException) as refused:
                    method()
                # Triton answers UNAVAILABLE (not PERMISSION_DENIED) for a restricted protocol
                assert refused.value.status() == "StatusCode.UNAVAILABLE", (name, headers)
                assert refused.value.message() == RESTRICTED_GRPC, (name, headers)
        assert client.is_model_ready("echo")
    finally:
        client.close()
    assert infer_grpc(echo.urls["grpc"], "still served")[0] == b"still served"


def test_grpc_admin_apis_answer_with_the_key(echo):
    client = grpcclient.InferenceServerClient(echo.urls["grpc"])
    region = _system_region()
    try:
        client.register_system_shared_memory("mine", region, 64, headers=GRPC_HEADER)
        assert "mine" in str(client.get_system_shared_memory_status(headers=GRPC_HEADER))
        client.unregister_system_shared_memory("mine", headers=GRPC_HEADER)
        with pytest.raises(InferenceServerException) as cuda:  # past the restriction; no CUDA handle here
            client.register_cuda_shared_memory("c", b"AAAA", 0, 64, headers=GRPC_HEADER)
        assert "restricted" not in cuda.value.message()
        assert "log_info" in str(client.get_log_settings(headers=GRPC_HEADER))
        client.update_log_settings({"log_info": True}, headers=GRPC_HEADER)
        client.get_trace_settings(headers=GRPC_HEADER)
        client.update_trace_settings(settings={}, headers=GRPC_HEADER)
        assert "echo" in str(client.get_model_repository_index(headers=GRPC_HEADER))
        client.unload_model("echo", headers=GRPC_HEADER)
        client.load_model("echo", headers=GRPC_HEADER)  # returns once loaded
        assert client.is_model_ready("echo")
    finally:
        os.unlink(f"/dev/shm{region}")
        client.close()


def test_what_clients_use_stays_open(echo):
    port = echo.http_port
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/echo", "/v2/models/echo/config",
                 "/v2/models/echo/stats", "/v2/models/echo/ready"):
        assert call(port, "GET", path)[0] == 200, path
    client = grpcclient.InferenceServerClient(echo.urls["grpc"])
    try:
        assert client.is_server_ready() and client.get_server_metadata().version
        assert client.get_model_metadata("echo").name == "echo"
        assert client.get_model_config("echo").config.name == "echo"
        assert client.get_inference_statistics("echo").model_stats
    finally:
        client.close()
    assert infer_http(echo.urls["http"], "http")[0] == b"http"
    assert infer_grpc(echo.urls["grpc"], "grpc")[0] == b"grpc"
    assert urllib.request.urlopen(echo.urls["metrics"], timeout=10).status == 200


def test_distrifusion_perf_runs_against_the_restricted_server(echo, tmp_path):
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"data": [{"INPUT": ["hello perf"]}]}))
    csv = tmp_path / "perf.csv"
    done = subprocess.run([sys.executable, "-m", "python_backend.cli", "perf", "--url", echo.urls["http"],
                           "--model", "echo", "--input-data", str(inputs), "--concurrency", "1",
                           "--request-count", "4", "--max-trials", "3", "--stability-percentage", "1000",
                           "--measurement-interval", "300", "--csv", str(csv)],
                          cwd=srv.PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert csv.is_file()


def test_the_python_backend_regions_are_private(echo):
    held = shm_files(srv.group_members(echo.pgid))
    regions = [path for path in held if Path(path).name.startswith(srv.SHM_REGION_PREFIX)]
    assert regions, held
    assert set(modes(held).values()) == {"0o600"}, modes(held)


def test_stop_with_an_idle_keepalive_connection_is_clean(echo):
    pgid = echo.pgid
    members = srv.group_members(pgid)
    held = shm_files(members)
    keepalive = http.client.HTTPConnection("127.0.0.1", echo.http_port)
    keepalive.request("GET", "/v2/health/live")
    assert keepalive.getresponse().read() == b""
    channel = grpcclient.InferenceServerClient(echo.urls["grpc"])
    assert channel.is_server_live()
    try:
        started = time.monotonic()
        code = echo.stop()
        took = time.monotonic() - started
    finally:
        keepalive.close()
        channel.close()
    log = echo.log_path.read_text()
    assert code == 0, echo.log_tail()
    assert took < CLEAN_STOP_S, took
    print(f"stopped in {took:.2f} s with an idle keep-alive connection open")
    assert "successfully unloaded 'echo'" in log and "Exit timeout expired" not in log
    assert srv.group_members(pgid) == [] and not any(alive(pid) for pid in members)
    assert not [path for path in held if os.path.exists(path)]


def test_regions_of_a_killed_server_are_removed_at_the_next_start(tmp_path):
    repository = write_echo_repository(tmp_path / "repository")
    # Without the launcher's fchmod guard: the umask alone does not keep boost from making regions 0644.
    killed = srv.TritonServer(repository, *srv.free_ports(3), workdir=tmp_path / "killed", private_shm=False)
    killed.start()
    try:
        killed.wait_ready(120)
        regions = [p for p in shm_files(srv.group_members(killed.pgid)) if srv.SHM_REGION_PREFIX in p]
        assert regions and set(modes(regions).values()) == {"0o644"}
        os.killpg(killed.pgid, signal.SIGKILL)  # a crash: nothing of the server cleans up
        killed.process.wait(30)
        deadline = time.monotonic() + 30
        while srv.group_members(killed.pgid):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        killed.stop()
    assert all(os.path.exists(path) for path in regions)  # left behind
    newest = max(os.stat(path).st_mtime for path in regions)
    time.sleep(max(0.0, newest + shared_memory.STALE_REGION_MIN_AGE_S + 0.5 - time.time()))

    with srv.TritonServer(repository, *srv.free_ports(3), workdir=tmp_path / "next") as server:
        assert not [path for path in regions if os.path.exists(path)]
        assert infer_http(server.urls["http"], "after a crash")[0] == b"after a crash"
        assert [p for p in shm_files(srv.group_members(server.pgid)) if srv.SHM_REGION_PREFIX in p]


# --------------------------------------------------------------------------------------------------
# The tiny-SDXL deployment with two ranks, started by `distrifusion serve`


# the default two-rank deployment decodes on the rank group: no vae_decoder model
MODELS = ("text_encoder", "denoiser", "postprocess", "pipeline", "pipeline_stream")
PYTHON_MODELS = ("text_encoder", "denoiser", "postprocess", "pipeline_stream")


class Deployment:
    def __init__(self, root: Path, model: Path):
        from python_backend.serving.repository import fill_repository

        self.root = root
        self.repository = fill_repository(root / "repository", tiny_serving_settings(model, default_steps=2))
        self.key_file = root / "admin.key"
        self.key_file.write_text(KEY + "\n")
        self.key_file.chmod(0o600)
        self.http_port, self.grpc_port, self.metrics_port = srv.free_ports(3)
        self.output = root / "serve.out"
        self.triton_log = root / "work" / srv.LOG_NAME
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "python_backend.cli", "serve", "--repository", str(self.repository),
                 "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                 "--metrics-port", str(self.metrics_port), "--admin-key-file", str(self.key_file),
                 "--workdir", str(root / "work"), "--ready-timeout", "600"],
                cwd=srv.PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_serving(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while "Press Ctrl+C to stop." not in self.output.read_text():
            assert self.process.poll() is None, self.output.read_text()[-4000:]
            assert time.monotonic() < deadline, self.output.read_text()[-4000:]
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in process_tree(self.process.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def deployment(tiny_sdxl, tmp_path_factory):
    served = Deployment(tmp_path_factory.mktemp("hardening-deployment"), tiny_sdxl)
    try:
        served.wait_serving()
        yield served
    finally:
        served.stop()


def _workers(tree) -> list[int]:
    found = []
    for pid in tree:
        try:
            if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_the_deployment_says_how_it_is_reachable(deployment):
    out = deployment.output.read_text()
    assert f"HTTP:    http://127.0.0.1:{deployment.http_port}" in out
    assert (f"restricted APIs: shared-memory, logging, trace, model-repository need the "
            f"'{srv.ADMIN_HTTP_HEADER}' header (key: file {deployment.key_file})") in out
    assert KEY not in out  # the key itself is never printed
    assert "reachable from other hosts" not in out


@pytest.mark.slow
def test_every_listener_of_the_deployment_is_on_loopback(deployment):
    tree = process_tree(deployment.process.pid)
    assert len(_workers(tree)) == TINY_RANKS, tree  # every rank, rank 0 too
    listeners = listening_sockets(tree)
    ports = {port for _, _, port in listeners}
    assert {deployment.http_port, deployment.grpc_port, deployment.metrics_port} <= ports, listeners
    assert len(listeners) > 3, listeners  # the rank group's gloo listeners too
    exposed = [entry for entry in listeners if not is_loopback_address(entry[1])]
    assert exposed == [], exposed
    print(f"{len(listeners)} listening sockets in {len(tree)} processes, all on loopback")


@pytest.mark.slow
def test_the_deployment_shared_memory_is_private(deployment):
    held = shm_files(process_tree(deployment.process.pid))
    regions = [path for path in held if Path(path).name.startswith(srv.SHM_REGION_PREFIX)]
    assert len(regions) >= len(PYTHON_MODELS), held
    assert set(modes(held).values()) == {"0o600"}, modes(held)


@pytest.mark.slow
def test_the_deployment_admin_apis_need_the_key_from_the_file(deployment):
    from python_backend.client import generate

    port = deployment.http_port
    assert call(port, "GET", "/v2/logging")[0] == 403
    assert call(port, "POST", "/v2/repository/models/denoiser/unload", {})[0] == 403
    assert call(port, "GET", "/v2/logging", headers=HTTP_HEADER)[0] == 200
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.grpc_port}")
    try:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("denoiser")
        assert "log_info" in str(client.get_log_settings(headers=GRPC_HEADER))
    finally:
        client.close()
    image = generate(f"127.0.0.1:{port}", "a red cube", steps=1)
    assert image.shape[-1] == 3 and image.dtype == np.uint8


@pytest.mark.slow
def test_sigterm_with_an_idle_connection_stops_the_deployment_cleanly(deployment):
    tree = process_tree(deployment.process.pid)
    held = shm_files(tree)
    assert _workers(tree)
    keepalive = http.client.HTTPConnection("127.0.0.1", deployment.http_port)
    keepalive.request("GET", "/v2/health/ready")
    assert keepalive.getresponse().status == 200  # read; the connection stays open and idle
    channel = grpcclient.InferenceServerClient(f"127.0.0.1:{deployment.grpc_port}")
    assert channel.is_server_ready()
    try:
        started = time.monotonic()
        deployment.process.send_signal(signal.SIGTERM)
        code = deployment.process.wait(30)
        took = time.monotonic() - started
    finally:
        keepalive.close()
        channel.close()
    out, log = deployment.output.read_text(), deployment.triton_log.read_text()
    assert code == 0, out[-3000:]
    assert took < CLEAN_STOP_S, (took, out[-3000:])
    print(f"distrifusion serve exited 0 {took:.2f} s after SIGTERM, a keep-alive connection open")
    for model in MODELS:
        assert f"successfully unloaded '{model}' version 1" in log, model
    for model in PYTHON_MODELS:
        assert f"{model}: finalize done" in log, model
    assert "Exit timeout expired" not in log and "killing" not in out
    assert not [pid for pid in tree if alive(pid)]
    assert not [path for path in held if os.path.exists(path)]
