"""The real tritonserver (from the nvidia-pytriton wheel) with a Python-backend model, and perf_analyzer."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import broken_repository
from python_backend.serving import server as srv
from python_backend.serving.perf_tools import find_perf_analyzer, run_perf_analyzer

CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "OUTPUT" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "CHILD_PID" data_type: TYPE_INT64 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# The spawned child runs a function it can import: this module, next to model.py.
WORKER = """\
def echo_loop(requests, replies):
    for item in iter(requests.get, None):
        replies.put(item)
"""

MODEL = """\
import multiprocessing
import os
import sys

import numpy as np
import torch  # noqa: F401  (the venv's site-packages are visible)
import python_backend  # noqa: F401  (the project is visible)
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(__file__))
from echo_worker import echo_loop


class TritonPythonModel:
    def initialize(self, args):
        multiprocessing.set_executable(os.environ["DISTRIFUSION_PYTHON"])
        ctx = multiprocessing.get_context("spawn")
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self.child = ctx.Process(target=echo_loop, args=(self.requests, self.replies), daemon=True)
        self.child.start()
        self.requests.put("ping")
        assert self.replies.get(timeout=60) == "ping"

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()[0]
            self.requests.put(text)
            echoed = self.replies.get(timeout=30)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT", np.array([echoed], dtype=np.object_)),
                pb_utils.Tensor("CHILD_PID", np.array([self.child.pid], dtype=np.int64)),
            ]))
        return responses

    def finalize(self):
        self.requests.put(None)
        self.child.join(timeout=10)
        if self.child.is_alive():
            self.child.terminate()
"""


def write_echo_repository(root: Path) -> Path:
    version = root / "echo" / "1"
    version.mkdir(parents=True)
    (root / "echo" / "config.pbtxt").write_text(CONFIG)
    (version / "model.py").write_text(MODEL)
    (version / "echo_worker.py").write_text(WORKER)
    return root


alive = srv.alive


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp("triton"))
    try:
        server.wait_ready(timeout=120)
        yield server
    finally:
        server.stop()


def infer_http(url: str, text: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    given = httpclient.InferInput("INPUT", [1], "BYTES")
    given.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    result = client.infer("echo", [given])
    return result.as_numpy("OUTPUT")[0], int(result.as_numpy("CHILD_PID")[0])


def infer_grpc(url: str, text: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    given = grpcclient.InferInput("INPUT", [1], "BYTES")
    given.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    result = client.infer("echo", [given])
    return result.as_numpy("OUTPUT")[0], int(result.as_numpy("CHILD_PID")[0])


def start_echo_server(root: Path, *extra_args: str) -> srv.TritonServer:
    repository = write_echo_repository(root / "repository")
    http, grpc, metrics = srv.free_ports(3)
    server = srv.TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              host="127.0.0.1", workdir=root / "work", extra_args=extra_args)
    server.start()
    return server


# Computed here, not by the code under test: the checkout holding this file's tests/ folder.
CHECKOUT = Path(__file__).resolve().parent.parent


def test_environment_for_the_stub(monkeypatch):
    import importlib.util

    import torch

    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/already/there")
    monkeypatch.setenv("PYTHONPATH", "/srv/user/path")
    env = srv.server_environment()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"

    # The interpreter's own libpython comes first (the stub links it by name), the wheel's libraries
    # next, and what the caller had is kept after them.
    libs = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0] == sysconfig.get_config_var("LIBDIR")
    assert (Path(libs[0]) / f"libpython{version}.so.1.0").is_file()
    pytriton = Path(importlib.util.find_spec("pytriton").origin).parent
    assert libs[1] == str(pytriton.parent / "nvidia_pytriton.libs")
    assert any(name.startswith("libtritonserver") for name in os.listdir(libs[1]))
    assert libs[-1] == "/opt/already/there" and len(libs) == len(set(libs))

    # The venv's bin folder first on PATH: the stub finds this venv's python3 (and its pyvenv.cfg).
    first_bin = Path(env["PATH"].split(os.pathsep)[0])
    assert first_bin == Path(sys.executable).parent
    assert (first_bin / "python3").exists() and (first_bin.parent / "pyvenv.cfg").is_file()

    # Worker processes import the project (the folder holding python_backend) and the venv's packages.
    pythonpath = env["PYTHONPATH"].split(os.pathsep)
    assert pythonpath[0] == str(CHECKOUT)
    assert (CHECKOUT / "python_backend" / "__init__.py").is_file()
    assert Path(importlib.util.find_spec("python_backend").origin).parent.parent == CHECKOUT
    assert str(Path(torch.__file__).parent.parent) in pythonpath
    assert pythonpath[-1] == "/srv/user/path"

    assert env["DISTRIFUSION_PYTHON"] == sys.executable
    assert env["DISTRIFUSION_PROJECT_ROOT"] == str(CHECKOUT)


def test_echo_over_http_and_grpc_with_metrics(echo_server):
    text, child = infer_http(echo_server.urls["http"], "hello http")
    assert text == b"hello http"
    assert alive(child) and os.getpgid(child) == echo_server.pgid

    text, child_again = infer_grpc(echo_server.urls["grpc"], "hello grpc")
    assert text == b"hello grpc" and child_again == child

    metrics = urllib.request.urlopen(echo_server.urls["metrics"], timeout=5).read().decode()
    assert "nv_inference_request_success" in metrics


def test_perf_analyzer_concurrency_one(echo_server, tmp_path):
    assert find_perf_analyzer().is_file()
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{"INPUT": ["hello perf"]}]}))
    out = tmp_path / "out.csv"
    run = run_perf_analyzer(["-m", "echo", "--input-data", data, "-u", echo_server.urls["http"], "-i", "http",
                             "--concurrency-range", "1:1", "--measurement-interval", "300",
                             "--stability-percentage", "1000", "--max-trials", "10", "-f", out],
                            workdir=tmp_path, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and float(rows[0]["Inferences/Second"]) > 0


def test_stop_leaves_no_process(echo_server):
    _, child = infer_http(echo_server.urls["http"], "last")
    pgid = echo_server.pgid
    assert srv.group_members(pgid)
    code = echo_server.stop()
    assert code == 0, echo_server.log_tail()
    assert srv.group_members(pgid) == []
    assert not alive(child)
    assert "successfully unloaded 'echo'" in echo_server.log_path.read_text()


def test_stop_kills_what_an_unclean_exit_leaves(tmp_path):
    server = start_echo_server(tmp_path)
    try:
        server.wait_ready(timeout=120)
        _, child = infer_http(server.urls["http"], "hello")
        pgid = server.pgid
        os.kill(server.process.pid, signal.SIGKILL)  # tritonserver alone dies: its stub and the child stay
        server.process.wait(30)
        assert alive(child) and srv.group_members(pgid)
        assert server.stop() == -signal.SIGKILL
        assert srv.group_members(pgid) == [] and not alive(child)
    finally:
        server.stop()


def test_serve_command_stops_cleanly_on_sigint(tmp_path):
    repository = write_echo_repository(tmp_path / "repository")
    http, grpc, metrics = srv.free_ports(3)
    cmd = [sys.executable, "-m", "python_backend.serving.server", "--repository", str(repository),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--host", "127.0.0.1", "--workdir", str(tmp_path / "work")]
    serve = subprocess.Popen(cmd, cwd=srv.PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not any("metrics:" in line for line in lines):
            line = serve.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any(f"http://127.0.0.1:{http}" in line for line in lines)
        assert any(f"127.0.0.1:{grpc}" in line for line in lines)
        text, child = infer_http(f"127.0.0.1:{http}", "via serve")
        assert text == b"via serve"
        server_pgid = os.getpgid(child)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=30) == 0, serve.stdout.read()
        assert srv.group_members(server_pgid) == [] and not alive(child)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()


def test_dead_server_raises_with_log_tail(tmp_path):
    repository = broken_repository(tmp_path)
    http, grpc, metrics = srv.free_ports(3)
    server = srv.TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              host="127.0.0.1", workdir=tmp_path / "work")
    with pytest.raises(srv.ServerError, match="exited with code"):
        with server:
            pass
    assert srv.group_members(server.pgid) == []


def test_serve_rejects_a_missing_repository(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    srv.add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--repository", str(tmp_path / "missing")])
    assert args.handler(args) == 2
    err = capsys.readouterr().err
    assert "--repository" in err and len(err.strip().splitlines()) == 1
