"""docker-compose.yml and the Dockerfile: the GPU serving stack has what it needs, every image is pinned,
and (where the docker compose CLI exists) compose itself accepts the file."""

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def _command(service) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def _mount_targets(service) -> dict:
    """target path -> source for short-syntax volumes."""
    mounts = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        mounts[parts[1]] = parts[0]
    return mounts


def _is_pinned(reference: str) -> bool:
    if "@sha256:" in reference:
        return True
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag:  # no tag at all ("host:5000/image" has a port, not a tag)
        return False
    return tag != "latest" and "${" not in tag and bool(re.search(r"\d", tag))


def _gpu_devices(service) -> list:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_triton_service_reserves_all_gpus(services):
    triton = services["triton"]
    assert "image" in triton or "build" in triton
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in _gpu_devices(triton)


def test_triton_serves_the_repository_with_the_engine_cache(compose, services):
    triton = services["triton"]
    assert "distrifusion serve --repository /repository" in _command(triton)
    mounts = _mount_targets(triton)
    named = set(compose["volumes"])
    assert mounts["/repository"] in named
    engine_targets = [target for target in mounts if "engines" in target]
    assert engine_targets and all(mounts[target] in named for target in engine_targets)


def test_ports_bind_to_a_configurable_address_defaulting_to_localhost(services):
    ports = services["triton"]["ports"]
    for port in (8000, 8001, 8002):
        assert f"${{BIND_ADDRESS:-127.0.0.1}}:{port}:{port}" in ports


def test_healthcheck_asks_for_readiness(services):
    check = services["triton"]["healthcheck"]
    test = " ".join(check["test"]) if isinstance(check["test"], list) else check["test"]
    assert "curl" in test and "http://localhost:8000/v2/health/ready" in test


def test_shared_memory_is_large_for_nccl(services):
    triton = services["triton"]
    assert triton.get("ipc") == "host" or re.fullmatch(r"\d+(gb|g)", str(triton.get("shm_size", "")).lower())


def test_engines_are_built_before_serving(services):
    triton = services["triton"]
    assert triton["depends_on"]["build"]["condition"] == "service_completed_successfully"
    build = services["build"]
    command = _command(build)
    for part in ("distrifusion build", "--recipe \"${RECIPE:-build/sdxl-1024-8gpu.toml}\"", "--model /models/sdxl", "--backend tensorrt", "--repository /repository"):
        assert part in command
    assert {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]} in _gpu_devices(build)
    assert (REPO / "build" / "sdxl-1024-8gpu.toml").is_file()  # the default recipe ships in the image
    # the build writes where triton reads
    triton_mounts, build_mounts = _mount_targets(triton), _mount_targets(build)
    for target, source in build_mounts.items():
        if target == "/repository" or "engines" in target:
            assert triton_mounts.get(target) == source


def test_model_control_api_stays_disabled():
    assert "model-control-mode" not in COMPOSE.read_text()


def test_perf_service_uses_the_sdk_image_on_demand(services):
    perf = services["perf"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3-sdk", perf["image"])
    assert perf["profiles"] == ["perf"]
    assert any(source.endswith("clients/perf_inputs.json") for source in _mount_targets(perf).values())
    command = _command(perf)
    assert "perf_analyzer" in command and "-m pipeline" in command and "triton:800" in command


def test_server_and_sdk_images_are_the_same_release(services):
    perf_tag = services["perf"]["image"].rsplit(":", 1)[1]
    from_line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    assert from_line.split()[1] == "nvcr.io/nvidia/tritonserver:" + perf_tag.removesuffix("-sdk")


def test_base_image_python_can_install_the_project():
    """NGC tritonserver releases before 24.12 ship Python 3.10 (Ubuntu 22.04); the pinned transformers and
    diffusers need Python >= 3.11, and the Python backend stub embeds the image's own Python."""
    from_line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    year, month = re.search(r"tritonserver:(\d\d)\.(\d\d)-py3", from_line).groups()
    assert (int(year), int(month)) >= (24, 12), from_line


def test_image_torch_and_tensorrt_share_one_cuda_major():
    """torch 2.13's default wheel is CUDA 13.0; the image from 25.08 on is CUDA 13; the TensorRT wheel names
    its CUDA. The doctor checks the same combination on the host."""
    import tomllib

    from python_backend.cli.doctor import SUPPORTED_CUDA_MAJOR, SUPPORTED_TENSORRT, TRITON_IMAGE

    from_line = next(line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("FROM "))
    assert from_line.split()[1] == TRITON_IMAGE
    year, month = re.search(r"tritonserver:(\d\d)\.(\d\d)-py3", from_line).groups()
    assert (int(year), int(month)) >= (25, 8)  # the first CUDA 13 release
    gpu = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    tensorrt = next(d for d in gpu if d.startswith("tensorrt"))
    assert tensorrt.startswith(f"tensorrt-cu{SUPPORTED_CUDA_MAJOR}=={SUPPORTED_TENSORRT}."), tensorrt


def test_the_build_service_runs_the_doctor_first(services):
    command = _command(services["build"])
    assert command.index("distrifusion doctor") < command.index("distrifusion build")
    assert "&&" in command  # a failing doctor stops the build


def test_every_image_is_pinned(services):
    images = [service["image"] for service in services.values() if "image" in service]
    assert images
    for image in images:
        assert _is_pinned(image), image


def test_dockerfile_base_is_pinned():
    dockerfile = (REPO / "Dockerfile").read_text()
    bases = [line.split() for line in dockerfile.splitlines() if line.strip().upper().startswith("FROM ")]
    assert bases
    for words in bases:
        image = next(word for word in words[1:] if not word.startswith("--"))
        assert _is_pinned(image), image


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped and backslash continuations joined as Docker does."""
    instructions, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    return instructions


def _index(instructions, predicate, what) -> int:
    found = [i for i, instruction in enumerate(instructions) if predicate(*instruction)]
    assert found, f"no {what} in the Dockerfile"
    return found[0]


def _dependency_install_code(instructions) -> str:
    """The inline Python of the dependency layer's ``python3 -c '...'``."""
    for keyword, arguments in instructions:
        if keyword == "RUN" and "tomllib" in arguments:
            words = shlex.split(arguments)
            return words[words.index("-c") + 1]
    raise AssertionError("no RUN python3 -c '... tomllib ...' (dependency layer) in the Dockerfile")


def test_image_installs_the_project_non_editable():
    runs = [arguments for keyword, arguments in _dockerfile_instructions() if keyword == "RUN"]
    installs = [run for run in runs if re.search(r"pip install\b.*\s\.(\s|$)", run)]
    assert installs, "no `pip install ... .` of the project in the Dockerfile"
    for run in installs:
        assert "--no-deps" in run, run  # the dependencies come from their own layer
    for run in runs:
        assert not re.search(r"pip install\b.*(\s-e\s|--editable)", run), run


def test_dependency_layer_comes_before_the_source():
    """Only pyproject.toml is copied before the dependencies install: an edit to the source does not reinstall
    torch. The source comes after, with the project's own (no-deps) install."""
    instructions = _dockerfile_instructions()
    copy_pyproject = _index(instructions, lambda k, a: k == "COPY" and a.split() == ["pyproject.toml", "./"],
                            "COPY pyproject.toml ./")
    dependencies = _index(instructions, lambda k, a: k == "RUN" and "tomllib" in a, "dependency RUN")
    copy_source = _index(instructions, lambda k, a: k == "COPY" and a.split() == [".", "."], "COPY . .")
    project = _index(instructions, lambda k, a: k == "RUN" and "--no-deps" in a, "project RUN")
    assert copy_pyproject < dependencies < copy_source < project
    copies_before = [a for k, a in instructions[:copy_source] if k in ("COPY", "ADD")]
    assert copies_before == ["pyproject.toml ./"], copies_before


def test_dependency_layer_installs_the_pins_and_the_gpu_extra_but_not_the_server_extra(tmp_path, monkeypatch):
    """Runs the Dockerfile's inline Python on this pyproject.toml with pip stubbed out: it asks for exactly the
    base dependencies plus the gpu extra. nvidia-pytriton (the server extra) never goes into the image, which
    has its own tritonserver."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any(dep.startswith("nvidia-pytriton") for dep in pyproject["dependencies"])
    assert pyproject["optional-dependencies"]["server"] == ["nvidia-pytriton==0.7.0"]
    code = _dependency_install_code(_dockerfile_instructions())
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda args, *a, **k: calls.append(list(args)) or 0)
    exec(compile(code, "Dockerfile RUN python3 -c", "exec"), {"__name__": "__main__"})
    assert len(calls) == 1 and calls[0][1:4] == ["-m", "pip", "install"], calls
    requirements = [arg for arg in calls[0][4:] if not arg.startswith("-")]
    assert requirements == pyproject["dependencies"] + pyproject["optional-dependencies"]["gpu"]
    assert "--break-system-packages" in calls[0]
    text = " ".join(arguments for _, arguments in _dockerfile_instructions())
    assert "pytriton" not in text and "server]" not in text and ",server" not in text


def test_pin_check_rejects_floating_tags():
    assert _is_pinned("nvcr.io/nvidia/tritonserver:24.10-py3")
    assert _is_pinned("ubuntu@sha256:" + "0" * 64)
    for reference in ("nvcr.io/nvidia/tritonserver", "tritonserver:latest", "localhost:5000/image", "image:${TAG}"):
        assert not _is_pinned(reference), reference


def _docker_compose_cli():
    """``docker compose`` (the v2 plugin), else the standalone ``docker-compose``; or None and why not."""
    reasons = []
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) is None:
            reasons.append(f"no {cli[0]} on PATH")
            continue
        try:
            probe = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            reasons.append(f"`{' '.join(cli)} version` failed: {error}")
            continue
        if probe.returncode == 0:
            return cli, None
        output = (probe.stderr or probe.stdout).strip().splitlines()
        reasons.append(f"`{' '.join(cli)} version` failed: {output[0] if output else 'no output'}")
    return None, "; ".join(reasons)


def test_docker_compose_accepts_the_file():
    cli, reason = _docker_compose_cli()
    if cli is None:
        pytest.skip(f"docker compose config not run: {reason}")
    done = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
