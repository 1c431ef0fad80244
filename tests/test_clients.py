"""The clients and the client/perf commands without a Triton server: request tensors, the HTTP and gRPC
clients against small fake servers, perf_analyzer's command line, and the CSV summary."""

import argparse
import json
import struct
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from python_backend.client import generate
from python_backend.client.request import INPUTS, SCHEDULERS, request_tensors
from python_backend.serving.client_commands import (
    DEFAULT_PERF_INPUTS, add_client_commands, format_perf_summary, perf_analyzer_command, read_perf_csv,
)

REPO = Path(__file__).resolve().parent.parent
IMAGE = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
ALL_OPTIONS = dict(negative_prompt="blurry", seed=7, steps=4, guidance_scale=5.5, scheduler="euler-a",
                   height=256, width=256)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="distrifusion")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# --- request tensors ------------------------------------------------------------------------------

def test_only_the_prompt_is_sent_by_default():
    ((name, array, dtype),) = request_tensors("a cat")
    assert (name, dtype, array.dtype, array.shape) == ("prompt", "BYTES", np.object_, (1,))
    assert array[0] == b"a cat"


def test_every_option_has_its_dtype_and_shape():
    tensors = {name: (array, dtype) for name, array, dtype in request_tensors("a cät", **ALL_OPTIONS)}
    assert list(tensors) == list(INPUTS)
    expected = {"prompt": ("BYTES", np.object_), "negative_prompt": ("BYTES", np.object_),
                "seed": ("INT64", np.int64), "steps": ("INT64", np.int64), "guidance_scale": ("FP32", np.float32),
                "scheduler": ("BYTES", np.object_), "height": ("INT64", np.int64), "width": ("INT64", np.int64)}
    for name, (triton_dtype, numpy_dtype) in expected.items():
        array, dtype = tensors[name]
        assert dtype == triton_dtype and array.dtype == numpy_dtype and array.shape == (1,), name
    assert tensors["prompt"][0][0] == "a cät".encode("utf-8")
    assert tensors["scheduler"][0][0] == b"euler-a"
    assert tensors["guidance_scale"][0][0] == np.float32(5.5)


def test_none_options_are_left_out():
    names = [name for name, _, _ in request_tensors("a cat", seed=0, steps=None, width=512)]
    assert names == ["prompt", "seed", "width"]  # seed=0 is a value, not "unset"


def test_schedulers_match_the_server():
    from python_backend.core.model import SCHEDULERS as SERVER_SCHEDULERS

    assert tuple(SCHEDULERS) == tuple(SERVER_SCHEDULERS)


def test_perf_inputs_file_is_valid_for_the_pipeline():
    data = json.loads((REPO / "clients" / "perf_inputs.json").read_text())["data"]
    assert len(data) >= 3 and len({entry["prompt"][0] for entry in data}) == len(data)
    for entry in data:
        assert set(entry) <= set(INPUTS) and "prompt" in entry
        for name, values in entry.items():
            assert isinstance(values, list) and len(values) == 1, name
            kind = INPUTS[name][1]
            if kind == "BYTES":
                assert isinstance(values[0], str)
            elif kind == "FP32":
                assert isinstance(values[0], (int, float))
            else:
                assert isinstance(values[0], int) and not isinstance(values[0], bool)
        assert entry["scheduler"][0] in SCHEDULERS
        assert entry["steps"] == [4] and entry["height"] == [256] and entry["width"] == [256]


# --- a fake HTTP/REST server (KServe v2 protocol, just enough for infer) -----------------------------

def _decode_http_inputs(body: bytes, header_length: int) -> dict:
    header = json.loads(body[:header_length])
    values, offset = {}, header_length
    for tensor in header["inputs"]:
        size = tensor["parameters"]["binary_data_size"]
        raw = body[offset:offset + size]
        offset += size
        if tensor["datatype"] == "BYTES":
            (length,) = struct.unpack("<I", raw[:4])
            value = raw[4:4 + length].decode("utf-8")
        else:
            dtype = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4"}[tensor["datatype"]]
            value = np.frombuffer(raw, dtype=dtype).item()
        values[tensor["name"]] = (tensor["datatype"], tensor["shape"], value)
    return values


@pytest.fixture
def http_server():
    """A server that records each request's inputs; prompt "fail" gets the error Triton would send."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            inputs = _decode_http_inputs(body, int(self.headers["Inference-Header-Content-Length"]))
            seen.append((self.path, inputs))
            if inputs["prompt"][2] == "fail":
                status, reply = 400, {"error": "unknown scheduler 'lms'; allowed: ddim, euler"}
            else:
                status, reply = 200, {"model_name": "pipeline", "outputs": [
                    {"name": "image", "datatype": "UINT8", "shape": list(IMAGE.shape), "data": IMAGE.ravel().tolist()}]}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_http_client_sends_the_set_options_and_returns_the_image(http_server):
    url, seen = http_server
    image = generate(url, "a cat", seed=3, steps=4, scheduler="ddim")
    assert image.dtype == np.uint8 and np.array_equal(image, IMAGE)
    path, inputs = seen[-1]
    assert path == "/v2/models/pipeline/infer"
    assert inputs == {"prompt": ("BYTES", [1], "a cat"), "seed": ("INT64", [1], 3),
                      "steps": ("INT64", [1], 4), "scheduler": ("BYTES", [1], "ddim")}


def test_http_client_sends_every_option(http_server):
    url, seen = http_server
    generate(url, "a cat", **ALL_OPTIONS)
    inputs = seen[-1][1]
    assert [name for name in inputs] == list(INPUTS)
    assert inputs["guidance_scale"] == ("FP32", [1], 5.5) and inputs["height"] == ("INT64", [1], 256)


def test_http_client_surfaces_the_server_error(http_server):
    from tritonclient.utils import InferenceServerException

    url, _ = http_server
    with pytest.raises(InferenceServerException, match="unknown scheduler 'lms'"):
        generate(url, "fail")


def test_http_client_script_saves_a_png(http_server, tmp_path):
    url, seen = http_server
    out = tmp_path / "image.png"
    done = subprocess.run([sys.executable, str(REPO / "clients" / "http_client.py"), "--url", url,
                           "--prompt", "a cat", "--guidance", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(out)), IMAGE)
    assert "saved" in done.stdout and set(seen[-1][1]) == {"prompt", "guidance_scale"}


def test_client_command_over_http(http_server, tmp_path, capsys):
    url, seen = http_server
    out = tmp_path / "sub" / "image.png"
    args = _parse(["client", "--url", url, "--prompt", "a cat", "--negative-prompt", "dark",
                   "--width", "256", "--out", str(out)])
    assert args.handler(args) == 0
    assert np.array_equal(np.asarray(Image.open(out)), IMAGE)
    assert set(seen[-1][1]) == {"prompt", "negative_prompt", "width"}
    printed = capsys.readouterr().out
    assert str(out) in printed and "seconds over HTTP" in printed


def test_client_command_reports_the_server_error(http_server, tmp_path, capsys):
    url, _ = http_server
    args = _parse(["client", "--url", url, "--prompt", "fail", "--out", str(tmp_path / "x.png")])
    assert args.handler(args) == 1
    assert "unknown scheduler 'lms'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--url", "http://localhost:8000"], "--url must be HOST:PORT without a scheme"),
    (["--url", "localhost"], "--url must be HOST:PORT without a scheme"),
    (["--url", "localhost:8000", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--url", "localhost:8000", "--height", "-8"], "--height must be >= 1, got -8"),
])
def test_client_command_bad_values(capsys, extra, message):
    args = _parse(["client", "--prompt", "a cat", "--out", "x.png", *extra])
    assert args.handler(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distrifusion client: error: ") and message in err[0]


# --- a fake gRPC server ------------------------------------------------------------------------------

@pytest.fixture
def grpc_server():
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    seen = []

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            inputs = {}
            for tensor, raw in zip(request.inputs, request.raw_input_contents):
                if tensor.datatype == "BYTES":
                    (length,) = struct.unpack("<I", raw[:4])
                    value = raw[4:4 + length].decode("utf-8")
                else:
                    value = np.frombuffer(raw, dtype={"INT64": "<i8", "INT32": "<i4", "FP32": "<f4"}[tensor.datatype]).item()
                inputs[tensor.name] = (tensor.datatype, list(tensor.shape), value)
            seen.append((request.model_name, inputs, [output.name for output in request.outputs]))
            if inputs["prompt"][2] == "fail":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "height 300 was not built; built: 256x256")
            output = service_pb2.ModelInferResponse.InferOutputTensor(name="image", datatype="UINT8", shape=IMAGE.shape)
            return service_pb2.ModelInferResponse(model_name=request.model_name, outputs=[output],
                                                  raw_output_contents=[IMAGE.tobytes()])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(grace=None)


def test_grpc_client_sends_the_set_options_and_returns_the_image(grpc_server):
    url, seen = grpc_server
    image = generate(url, "a cat", protocol="grpc", **ALL_OPTIONS)
    assert image.dtype == np.uint8 and np.array_equal(image, IMAGE)
    model, inputs, outputs = seen[-1]
    assert model == "pipeline" and outputs == ["image"] and list(inputs) == list(INPUTS)
    assert inputs["seed"] == ("INT64", [1], 7) and inputs["guidance_scale"] == ("FP32", [1], 5.5)
    assert inputs["scheduler"] == ("BYTES", [1], "euler-a")
    generate(url, "a dog", protocol="grpc", model="other")
    assert seen[-1][0] == "other" and list(seen[-1][1]) == ["prompt"]


def test_grpc_client_surfaces_the_server_error(grpc_server):
    from tritonclient.utils import InferenceServerException

    url, _ = grpc_server
    with pytest.raises(InferenceServerException, match="height 300 was not built"):
        generate(url, "fail", protocol="grpc", height=300)


def test_client_command_over_grpc(grpc_server, tmp_path, capsys):
    url, seen = grpc_server
    out = tmp_path / "image.png"
    args = _parse(["client", "--url", url, "--protocol", "grpc", "--prompt", "a cat", "--seed", "5",
                   "--scheduler", "dpmpp-2m", "--out", str(out)])
    assert args.handler(args) == 0
    assert np.array_equal(np.asarray(Image.open(out)), IMAGE)
    assert seen[-1][1]["scheduler"][2] == "dpmpp-2m" and "seconds over gRPC" in capsys.readouterr().out


# --- perf -----------------------------------------------------------------------------------------

def test_perf_analyzer_command_defaults():
    args = _parse(["perf", "--url", "localhost:8001", "--protocol", "grpc"])
    assert perf_analyzer_command(args, "/opt/bin/perf_analyzer") == [
        "/opt/bin/perf_analyzer", "-m", "pipeline", "-u", "localhost:8001", "-i", "grpc",
        "--concurrency-range", "1:2", "--input-data", str(DEFAULT_PERF_INPUTS),
        "--measurement-mode", "count_windows", "--measurement-request-count", "4",
        "--measurement-interval", "5000", "--stability-percentage", "50", "--max-trials", "6",
        "-f", "perf.csv",
    ]
    assert DEFAULT_PERF_INPUTS.is_file()
    assert (REPO / "clients" / "perf_inputs.json").resolve() == DEFAULT_PERF_INPUTS.resolve()  # the example links it


def test_perf_analyzer_command_options(tmp_path):
    inputs = tmp_path / "in.json"
    args = _parse(["perf", "--url", "gpu-host:8000", "--concurrency", "1:8:2", "--input-data", str(inputs),
                   "--measurement-interval", "20000", "--request-count", "10", "--stability-percentage", "25",
                   "--max-trials", "9", "--csv", str(tmp_path / "out" / "run1.csv"), "--model", "other"])
    command = perf_analyzer_command(args)
    assert command[0] == "perf_analyzer"
    pairs = dict(zip(command[1::2], command[2::2]))
    assert pairs == {"-m": "other", "-u": "gpu-host:8000", "-i": "http", "--concurrency-range": "1:8:2",
                     "--input-data": str(inputs), "--measurement-mode": "count_windows",
                     "--measurement-request-count": "10", "--measurement-interval": "20000",
                     "--stability-percentage": "25", "--max-trials": "9", "-f": "run1.csv"}


@pytest.mark.parametrize("extra, message", [
    (["--concurrency", "1-4"], "--concurrency must be START[:END[:STEP]], got '1-4'"),
    (["--input-data", "no/such.json"], "--input-data: no such file no/such.json"),
    (["--request-count", "0"], "--request-count must be >= 1, got 0"),
    (["--max-trials", "2"], "--max-trials must be >= 3"),
    (["--csv", "perf.txt"], "--csv must end in .csv, got perf.txt"),
])
def test_perf_bad_values(capsys, extra, message):
    args = _parse(["perf", "--url", "localhost:8000", *extra])
    assert args.handler(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distrifusion perf: error: ") and message in err[0]


SAMPLE_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
2,0.52,61,1532,1850210,211,1961034,3911,12,3821044,3990012,4012345,4105877
1,0.41,58,1207,95,198,2401118,3650,11,2402560,2480001,2490111,2511342
"""


def test_perf_csv_summary(tmp_path):
    path = tmp_path / "perf.csv"
    path.write_text(SAMPLE_CSV)
    rows = read_perf_csv(path)
    assert rows == [
        {"concurrency": 1, "throughput": 0.41, "p50_ms": 2402.56, "p99_ms": 2511.342},
        {"concurrency": 2, "throughput": 0.52, "p50_ms": 3821.044, "p99_ms": 4105.877},
    ]
    table = format_perf_summary(rows).splitlines()
    assert table[0].split() == ["concurrency", "infer/s", "p50", "ms", "p99", "ms"]
    assert table[1].split() == ["1", "0.410", "2402.6", "2511.3"]
    assert table[2].split() == ["2", "0.520", "3821.0", "4105.9"]
