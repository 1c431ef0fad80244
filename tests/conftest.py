import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REQUIRE_GPU = os.environ.get("REQUIRE_GPU") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With REQUIRE_GPU=1 (scripts/run_gpu_tests.sh) a skipped GPU test is a failure: a GPU run whose
    tests all skipped must not read as a pass."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_GPU and report.skipped and item.get_closest_marker("gpu") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"REQUIRE_GPU=1 and this GPU test was skipped: {reason}"


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from python_backend.embedded.tiny_model import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from python_backend.embedded.tiny_model import write_tiny_sd15

    return write_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15", seed=0)


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rank_workers(server) -> list[int]:
    """Pids of the denoiser's rank worker processes, rank 0 first: every rank is a worker (multiprocessing
    spawn child) in the server's process group; their order is the one the denoiser published."""
    import json

    from python_backend.serving.server import group_members

    workers = []
    for pid in group_members(server.pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing.spawn" in f.read():
                    workers.append(pid)
        except OSError:
            continue  # the process exited while we looked
    try:
        published = json.loads((server.status_dir / "denoiser.json").read_text())["workers"]
    except (OSError, TypeError, ValueError, KeyError):
        published = []
    order = {pid: rank for rank, pid in enumerate(published)}
    return sorted(workers, key=lambda pid: order.get(pid, len(order)))


TINY_SIZE = 128  # the tests' image size for the tiny model: a fraction of a second per step on 2 cores
TINY_RANKS = 2


def tiny_serving_settings(model, **overrides):
    """Serving settings for the tiny model: 2 CPU ranks in one patch group, TINY_SIZE only."""
    from python_backend.serving.settings import ServingSettings

    values = dict(model_dir=str(model), ranks=TINY_RANKS, split_cfg=False, sizes=f"{TINY_SIZE}x{TINY_SIZE}",
                  default_height=TINY_SIZE, default_width=TINY_SIZE)
    return ServingSettings(**{**values, **overrides})


FAULTS_TIMEOUT = 8.0  # the faults server's request timeout (s)
FAULTS_RANK_TIMEOUT = 10.0  # ... and rank timeout (s)
FAULTS_LONG = 10_000  # steps it allows: many minutes of denoising, far longer than its request timeout


@pytest.fixture(scope="session")
def engine_root(tmp_path_factory):
    """One build cache for the engine tests of every module: a request some test already built is a cache hit
    (the cache key covers everything a build depends on; tests/test_engines.py tests that it does)."""
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def faults_server(tiny_sdxl, tmp_path_factory):
    """One tritonserver for the fault, streaming and demo tests (test_faults.py, test_demo.py): short
    timeouts and very long generations allowed, so a test can start one and stop it."""
    from python_backend.serving.repository import serve_repository

    settings = tiny_serving_settings(tiny_sdxl, default_steps=2, warmup_steps=1, max_steps=FAULTS_LONG,
                                     request_timeout_s=FAULTS_TIMEOUT, rank_timeout_s=FAULTS_RANK_TIMEOUT)
    with serve_repository(settings, tmp_path_factory.mktemp("faults")) as triton:
        yield triton


def reference_image(model, prompt: str, seed: int, steps: int, size: int = TINY_SIZE):
    """The image the served defaults should give, generated in this process on one CPU rank in float32."""
    from python_backend.cli.generate_job import GenerationJob, run_generation_job
    from python_backend.core.defaults import DEFAULT_GUIDANCE, DEFAULT_MODE_NAME, DEFAULT_SCHEDULER
    from python_backend.core.denoise import GenerationRequest
    from python_backend.core.modes import Mode
    from python_backend.core.parallel import ParallelConfig
    from python_backend.core.ranks import run_on_ranks

    request = GenerationRequest(prompt, height=size, width=size, steps=steps, seed=seed, guidance=DEFAULT_GUIDANCE,
                                scheduler=DEFAULT_SCHEDULER)
    job = GenerationJob(str(model), [(request, ParallelConfig(Mode(DEFAULT_MODE_NAME), 1, True))],
                        decode=True, progress=False, dtype="float32")
    return run_on_ranks(1, run_generation_job, (job,))[0].images[0]


def served_image_twice(settings, tmp_path, prompt: str, seed: int):
    """Serves ``settings`` on a real tritonserver and asks for the same image over HTTP and gRPC; returns
    (HTTP image, gRPC image, group restarts seen by the server)."""
    from python_backend.client import generate
    from python_backend.serving.repository import serve_repository

    with serve_repository(settings, tmp_path) as server:
        image = generate(server.urls["http"], prompt, seed=seed)
        again = generate(server.urls["grpc"], prompt, protocol="grpc", seed=seed)
        return image, again, group_restarts(server)


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie has exited already)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_exited(pids, timeout: float = 60.0) -> None:
    """Waits until every process of ``pids`` has exited completely: gone, or a zombie whose threads
    have all ended, so that its parent's ``waitpid`` (``Process.is_alive``) sees it. A killed
    process's main thread turns zombie while its other threads are still ending."""
    import time

    def ended(pid):
        try:
            return not alive(pid) and len(os.listdir(f"/proc/{pid}/task")) <= 1
        except OSError:
            return True

    deadline = time.monotonic() + timeout
    while not all(ended(pid) for pid in pids):
        assert time.monotonic() < deadline, f"processes {list(pids)} did not end within {timeout:g} s"
        time.sleep(0.01)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_busy(pid: int, cpu: float = 0.3, timeout: float = 120.0) -> None:
    """Waits until process ``pid`` has used ``cpu`` more seconds of CPU time: a request has reached it
    and it is computing (no guess at how long the way there takes on a busy machine)."""
    import time

    start, deadline = cpu_seconds(pid), time.monotonic() + timeout
    while cpu_seconds(pid) - start < cpu:
        assert time.monotonic() < deadline, f"process {pid} did not start computing within {timeout:g} s"
        time.sleep(0.02)


def broken_repository(folder):
    """A model repository whose one model has an unreadable config: the server cannot serve it."""
    repository = folder / "repository"
    (repository / "broken").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text('backend: "python"\nthis is not pbtxt')
    return repository


def ready_answer(port: int) -> tuple[int, str]:
    """Status and body of ``GET /v2/health/ready`` on ``port`` (the gateway's, or tritonserver's own)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/v2/health/ready")
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def group_restarts(server) -> float:
    """The denoiser's rank-group restart counter, read from the server's /metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(server.urls["metrics"], timeout=10).read().decode()
    found = re.search(r"^distrifusion_rank_group_restarts_total\{[^}]*\} (\S+)$", text, re.M)
    assert found, "the restart counter is not exported"
    return float(found.group(1))
