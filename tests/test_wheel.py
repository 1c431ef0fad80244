"""The project as a wheel: built from the sources, installed (not editable) into a fresh virtualenv, it runs
from outside the checkout: the console script, the packaged templates and perf inputs, every served model
module, and the real tritonserver over a repository the wheel's ``distrifusion build`` filled.

The fresh venv sees the dependencies through a ``deps.pth`` naming this checkout's .venv site-packages: a
plain path line in a .pth is appended to ``sys.path``, and the .pth files inside that folder (this
checkout's editable finder among them) are not executed, so the only ``python_backend`` it can import is
the wheel's."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from python_backend.serving.server import free_ports

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parent.parent
MODELS = ("text_encoder", "denoiser", "vae_decoder", "postprocess", "pipeline", "pipeline_stream")
SERVED_MODULES = ("text_encoder_model", "denoiser_model", "vae_decoder_model", "postprocess_model", "stream_model")
SIZE, RANKS = 256, 2
SERVED_AT_RANKS = tuple(m for m in MODELS if m != "vae_decoder")  # N > 1: the rank group decodes (parallel VAE)


def _run(args, *, cwd, env, timeout=300, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, (f"{' '.join(map(str, args))} exited {done.returncode}\n"
                                      f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
    return done


def _clean_env(venv: Path) -> dict:
    """This process's environment minus anything that would steer the new venv's imports or pip."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV")
           and not k.startswith("PIP_")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(venv)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class Installed:
    def __init__(self, root: Path, venv: Path, site: Path, env: dict):
        self.root, self.venv, self.site, self.env = root, venv, site, env
        self.python = venv / "bin" / "python"
        self.distrifusion = venv / "bin" / "distrifusion"

    def python_json(self, code: str, env=None):
        """Runs ``code`` (which prints one JSON value last) in the new venv, from outside the checkout."""
        done = _run([self.python, "-c", code], cwd=self.root, env=env or self.env)
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what goes into the wheel, so the checkout gets no build/ or egg-info writes.
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, source / name)
    shutil.copytree(CHECKOUT / "python_backend", source / "python_backend",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist,
          source], cwd=root, env={**os.environ, "PIP_NO_INPUT": "1"})
    wheels = sorted(dist.glob("distrifusion_triton-*.whl"))
    assert len(wheels) == 1, wheels

    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root, env=os.environ.copy())
    env = _clean_env(venv)
    # This checkout's pip installs into the new venv (--python); before deps.pth exists the new venv sees
    # no other installation of the project, so pip has nothing to "upgrade" anywhere else.
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index",
          wheels[0]], cwd=root, env=env)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, env=env).stdout.strip())
    dependencies = sysconfig.get_paths()["purelib"]  # this checkout's .venv site-packages
    (site / "deps.pth").write_text(dependencies + "\n")
    return Installed(root, venv, site, env)


def test_the_package_comes_from_the_new_venv(installed):
    found = installed.python_json(
        "import json, sys, python_backend; from pathlib import Path\n"
        "holders = [p for p in sys.path if (Path(p or '.') / 'python_backend').exists()]\n"
        "print(json.dumps({'file': python_backend.__file__, 'holders': holders}))")
    assert Path(found["file"]).is_relative_to(installed.site), found
    assert [Path(p) for p in found["holders"]] == [installed.site], found
    assert str(CHECKOUT) + os.sep not in found["file"]


def test_package_data_is_read_from_the_new_venv(installed):
    found = installed.python_json(
        "import json\n"
        "from python_backend.serving.repository import TEMPLATES\n"
        "from python_backend.serving.client_commands import DEFAULT_PERF_INPUTS\n"
        "print(json.dumps({'templates': str(TEMPLATES), 'perf': str(DEFAULT_PERF_INPUTS)}))")
    templates, perf = Path(found["templates"]), Path(found["perf"])
    assert templates == installed.site / "python_backend" / "serving" / "model_repository"
    assert perf == installed.site / "python_backend" / "client" / "perf_inputs.json"
    for model in MODELS:
        assert (templates / model / "config.pbtxt").is_file(), model
        assert (templates / model / "1" / ("model.py" if model != "pipeline" else ".keep")).is_file(), model
    assert json.loads(perf.read_text())["data"]


def test_every_served_model_module_imports(installed):
    """The modules the Triton models load (inside Triton's Python backend, whose triton_python_backend_utils
    comes from the nvidia-pytriton wheel here) import from the wheel, the subpackages included."""
    pytriton = importlib.util.find_spec("pytriton")
    assert pytriton is not None, "nvidia-pytriton (the server extra) is not installed in this checkout's .venv"
    utils_dir = Path(pytriton.origin).parent / "tritonserver" / "backends" / "python"
    assert (utils_dir / "triton_python_backend_utils.py").is_file()
    modules = [f"python_backend.serving.{name}" for name in SERVED_MODULES]
    found = installed.python_json(
        "import importlib, json, sys\n"
        f"files = {{name: importlib.import_module(name).__file__ for name in {modules!r}}}\n"
        "print(json.dumps(files))",
        env={**installed.env, "PYTHONPATH": str(utils_dir)})
    assert set(found) == set(modules)
    for name, file in found.items():
        assert Path(file).is_relative_to(installed.site), (name, file)


def test_only_the_served_models_need_triton(installed):
    """nvidia-pytriton is the optional server extra: with it made unimportable, every module but the ones that
    run inside Triton's Python backend still imports (server.py looks for pytriton lazily)."""
    found = installed.python_json(
        "import importlib, json, pkgutil, sys\n"
        "sys.modules['pytriton'] = None  # an import of pytriton raises ImportError\n"
        "import python_backend\n"
        "failed = {}\n"
        "for module in pkgutil.walk_packages(python_backend.__path__, 'python_backend.'):\n"
        "    if module.name.endswith('__main__'):\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module(module.name)\n"
        "    except ImportError as error:\n"
        "        failed[module.name] = error.name\n"
        "print(json.dumps(failed))")
    triton_only = {f"python_backend.serving.{name}" for name in (*SERVED_MODULES, "triton_io")}
    assert set(found) <= triton_only, found
    assert set(found.values()) <= {"triton_python_backend_utils"}, found


@pytest.fixture(scope="module")
def repository(installed) -> Path:
    model, repo = installed.root / "tiny-sdxl", installed.root / "repository"
    _run([installed.distrifusion, "tiny-model", model], cwd=installed.root, env=installed.env)
    _run([installed.distrifusion, "build", "--model", model, "--height", SIZE, "--width", SIZE, "--ranks", RANKS,
          "--backend", "torch", "--repository", repo], cwd=installed.root, env=installed.env)
    return repo


def test_the_console_script_builds_a_repository(installed, repository):
    assert installed.distrifusion.read_text().startswith(f"#!{installed.python}")
    assert sorted(p.name for p in repository.iterdir()) == sorted(SERVED_AT_RANKS)
    model = installed.root / "tiny-sdxl"
    for name in SERVED_AT_RANKS:
        config = (repository / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in config
        if name != "pipeline":
            assert "# PARAMETERS" not in config
            assert str(model.resolve()) in config, (name, config)
            assert (repository / name / "1" / "model.py").is_file()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tritonserver_pids(repository: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"tritonserver") and \
                    f"--model-repository={repository.resolve()}".encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def _environ(pid: int) -> dict:
    pairs = (entry.partition(b"=") for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if entry)
    return {key.decode(): value.decode(errors="replace") for key, _, value in pairs}


def test_tritonserver_serves_the_wheel_filled_repository(installed, repository):
    """``distrifusion serve`` from the new venv starts the real tritonserver over the repository; it
    becomes ready, one small request saves a PNG, and SIGTERM stops it."""
    http, grpc, metrics = free_ports(3)
    log = installed.root / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [str(installed.distrifusion), "serve", "--repository", str(repository), "--host", "127.0.0.1",
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
             "--workdir", str(installed.root / "work"), "--ready-timeout", "240"],
            cwd=installed.root, env=installed.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not _ready(http):
            assert serve.poll() is None, f"distrifusion serve exited {serve.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not ready after 240 s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)

        # The server (and the Python backend's processes, which inherit its environment) look for the project
        # in the new venv, never in the checkout.
        pids = _tritonserver_pids(repository)
        assert len(pids) == 1, pids
        environ = _environ(pids[0])
        assert Path(environ["DISTRIFUSION_PROJECT_ROOT"]) == installed.site
        assert Path(environ["DISTRIFUSION_PYTHON"]) == installed.python
        pythonpath = [Path(p) for p in environ["PYTHONPATH"].split(os.pathsep) if p]
        assert pythonpath[0] == installed.site, pythonpath
        assert all(not (p / "python_backend").exists() for p in pythonpath if p != installed.site), pythonpath
        assert environ["PATH"].split(os.pathsep)[0] == str(installed.venv / "bin")

        image = installed.root / "img.png"
        _run([installed.distrifusion, "client", "--url", f"127.0.0.1:{http}", "--prompt", "x", "--steps", 2,
              "--out", image], cwd=installed.root, env=installed.env, timeout=180)
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        with Image.open(image) as picture:
            assert picture.size == (SIZE, SIZE)
    finally:
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
        try:
            code = serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
            code = None
    assert code == 0, f"distrifusion serve exited {code} after SIGTERM:\n{log.read_text()[-4000:]}"
    assert not _tritonserver_pids(repository), "tritonserver outlived distrifusion serve"
