"""Run the real NVIDIA Triton Inference Server (``tritonserver``) for the serving pipeline.

Where the binary comes from
---------------------------
* Inside an NGC ``tritonserver`` container: ``/opt/tritonserver/bin/tritonserver`` (or ``tritonserver``
  on PATH next to a ``backends/python`` folder) with the container's own backends.
* Anywhere else: the ``nvidia-pytriton`` wheel, which ships ``pytriton/tritonserver/bin/tritonserver``,
  the Python backend (``backends/python/libtriton_python.so``) and one Python backend stub per Python
  version (``python_backend_stubs/<major.minor>/triton_python_backend_stub``). The wheel's own shared
  libraries (``libtritonserver-*.so``, ``libcudart-*.so``, ...) live in site-packages
  ``nvidia_pytriton.libs/``. :func:`prepare_backend_dir` builds a fresh backend folder
  ``<workdir>/backends/python/`` holding ``libtriton_python.so``, ``triton_python_backend_utils.py`` and
  the stub for the running interpreter's version (the Python backend looks for the stub next to
  ``libtriton_python.so``).

The environment the server and its Python backend stub need (:func:`server_environment`)
---------------------------------------------------------------------------------------
* ``LD_LIBRARY_PATH``: first the running interpreter's libpython folder
  (``sysconfig.get_config_var("LIBDIR")``), then ``nvidia_pytriton.libs``. The stub links
  ``libpython3.X.so.1.0`` by name; if the system's libpython (another build of the same version) is
  found first, the stub's embedded interpreter mixes two Python builds (the system libpython with our
  interpreter's standard library and extension modules), and ``multiprocessing`` in particular breaks.
  ``nvidia_pytriton.libs`` holds the libraries ``libtriton_python.so`` needs once it is copied out of the
  wheel (its RPATH is relative to the wheel).
* ``PATH``: the interpreter's bin folder first. This is what makes the venv visible to the stub: its
  embedded interpreter is initialised in isolated mode (it ignores ``PYTHONPATH``, ``PYTHONHOME`` and the
  like) and has no program path of its own, so it looks up ``python3`` on PATH to find its prefix;
  finding the venv's ``python3`` (and its ``pyvenv.cfg``) puts the venv's site-packages (and so the
  editable install of this project) on ``sys.path``, and makes ``sys.executable`` the venv's python.
* ``PYTHONPATH``: the project root, then the interpreter's site-packages. The stub itself ignores it, but
  the processes a model starts are ordinary interpreters that honour it.
* ``DISTRIFUSION_PYTHON`` (:data:`PYTHON_ENV_VAR`): the running interpreter (``sys.executable``). A model
  that starts worker processes calls ``multiprocessing.set_executable(os.environ["DISTRIFUSION_PYTHON"])``
  before it starts them, so they never depend on what the stub guessed for ``sys.executable``.
* ``DISTRIFUSION_PROJECT_ROOT`` (:data:`PROJECT_ROOT_ENV_VAR`): the folder holding ``python_backend``; a
  model can put it on ``sys.path`` where the project is not installed into the interpreter.

Processes
---------
:class:`TritonServer` starts ``tritonserver`` in a new session (its own process group), with stdout and
stderr in ``<workdir>/tritonserver.log``. The stubs, and any processes they start, stay in that group
unless they leave it themselves; after the server exits, :meth:`TritonServer.stop` kills whatever of
the group remains. On SIGTERM the server first waits (up to ``--exit-timeout-secs``, 5 s here unless
``extra_args`` says otherwise) for open HTTP connections and in-flight requests; if that time runs out it
exits at once without unloading its models, so ``finalize`` never runs and the stubs are left for the
group kill. Close (or drop) clients before stopping to get a clean unload.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

log = logging.getLogger("distrifusion.server")

PYTHON_ENV_VAR = "DISTRIFUSION_PYTHON"
"""Environment variable naming the Python interpreter models must use for worker processes."""
PROJECT_ROOT_ENV_VAR = "DISTRIFUSION_PROJECT_ROOT"
"""Environment variable naming the folder that holds the ``python_backend`` package."""

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding python_backend/
NGC_ROOT = Path("/opt/tritonserver")
LOG_NAME = "tritonserver.log"
LOG_TAIL_LINES = 40
DEFAULT_EXIT_TIMEOUT_S = 5


class ServerError(RuntimeError):
    """The server could not be found, did not start, or died; the message holds its log tail."""


# --------------------------------------------------------------------------------------------------
# Locating the binary and the backends


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def _wheel_tritonserver_dir() -> Path | None:
    root = _pytriton_root()
    return root / "tritonserver" if root is not None else None


def _wheel_libs_dir() -> Path | None:
    root = _pytriton_root()
    return root.parent / "nvidia_pytriton.libs" if root is not None else None


def _ngc_root() -> Path | None:
    """The install root of a container's tritonserver (one with its own Python backend), if any."""
    candidates = [NGC_ROOT / "bin" / "tritonserver"]
    on_path = shutil.which("tritonserver")
    if on_path:
        candidates.append(Path(on_path).resolve())
    for binary in candidates:
        root = binary.parent.parent
        if binary.is_file() and (root / "backends" / "python" / "libtriton_python.so").is_file():
            return root
    return None


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary: the container's one when there is one, else the pytriton wheel's."""
    ngc = _ngc_root()
    if ngc is not None:
        return ngc / "bin" / "tritonserver"
    wheel = _wheel_tritonserver_dir()
    if wheel is not None and (wheel / "bin" / "tritonserver").is_file():
        return wheel / "bin" / "tritonserver"
    raise ServerError("tritonserver not found: install the server extra (pip install 'distrifusion-triton[server]', "
                      "which brings nvidia-pytriton==0.7.0) "
                      "or run inside an NGC tritonserver container")


def _stub_path() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheel = _wheel_tritonserver_dir()
    stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub" if wheel else None
    if stub is None or not stub.is_file():
        raise ServerError(f"no Triton Python backend stub for Python {version} in the nvidia-pytriton wheel")
    return stub


def prepare_backend_dir(workdir: Path) -> Path:
    """The ``--backend-directory`` to pass: the container's backends, or a fresh one in ``workdir``.

    The fresh one holds ``python/`` with the wheel's Python backend and the stub for this interpreter.
    """
    ngc = _ngc_root()
    if ngc is not None:
        return ngc / "backends"
    wheel = _wheel_tritonserver_dir()
    if wheel is None:
        raise ServerError("nvidia-pytriton is not installed: no Triton Python backend to use")
    backends = Path(workdir) / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(wheel / "backends" / "python" / name, python_dir / name)
    shutil.copy2(_stub_path(), python_dir / "triton_python_backend_stub")
    log.debug("prepared the Python backend in %s", python_dir)
    return backends


# --------------------------------------------------------------------------------------------------
# Environment


def _prepend(env: dict, name: str, entries: Sequence[str]) -> None:
    present = [e for e in env.get(name, "").split(os.pathsep) if e]
    wanted = [e for e in entries if e]
    merged = wanted + [e for e in present if e not in wanted]
    env[name] = os.pathsep.join(dict.fromkeys(merged))


def _site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def server_environment() -> dict:
    """The environment for the ``tritonserver`` process (see the module docstring for why)."""
    env = os.environ.copy()
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    wheel_libs = _wheel_libs_dir()
    if wheel_libs is not None and wheel_libs.is_dir():
        libs.append(str(wheel_libs))
    _prepend(env, "LD_LIBRARY_PATH", libs)
    _prepend(env, "PATH", [str(Path(sys.executable).parent)])
    _prepend(env, "PYTHONPATH", [str(PROJECT_ROOT), *_site_packages()])
    env[PYTHON_ENV_VAR] = sys.executable
    env[PROJECT_ROOT_ENV_VAR] = str(PROJECT_ROOT)
    return env


# --------------------------------------------------------------------------------------------------
# Process-group helpers


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now on this machine (for tests)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def kill_group(pgid: int, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process left in group ``pgid``; returns those that were found."""
    found = group_members(pgid)
    if not found:
        return []
    log.warning("killing %d process(es) left in the server's process group: %s", len(found), found)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return found
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _client_host(host: str) -> str:
    return "localhost" if host in ("", "0.0.0.0", "::") else host


# --------------------------------------------------------------------------------------------------
# The server


class TritonServer:
    """One ``tritonserver`` process over a model repository. Use as ``with TritonServer(repo) as s:``."""

    def __init__(self, repository, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 host: str = "0.0.0.0", workdir=None, log_verbose: int = 0, extra_args: Sequence[str] = ()):
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.workdir = Path(workdir) if workdir is not None else None
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # -- public API -------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        return self.workdir / LOG_NAME if self.workdir is not None else None

    @property
    def pgid(self) -> int | None:
        """The server's process group (its pid: it leads a new session)."""
        return self.process.pid if self.process is not None else None

    @property
    def urls(self) -> dict:
        """Client addresses: ``http`` and ``grpc`` as "host:port", ``metrics`` as a full URL."""
        host = _client_host(self.host)
        return {"http": f"{host}:{self.http_port}", "grpc": f"{host}:{self.grpc_port}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}

    def command(self, backend_dir: Path) -> list[str]:
        args = [str(find_tritonserver()),
                f"--model-repository={self.repository}",
                f"--backend-directory={backend_dir}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                f"--log-verbose={self.log_verbose}"]
        if not any(a.startswith("--exit-timeout-secs") for a in self.extra_args):
            args.append(f"--exit-timeout-secs={DEFAULT_EXIT_TIMEOUT_S}")
        return args + self.extra_args

    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServerError("the server is already started")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} is not a folder")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="distrifusion-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command(prepare_backend_dir(self.workdir))
        self._log_file = open(self.log_path, "wb")
        log.info("starting tritonserver for %s (log: %s)", self.repository, self.log_path)
        log.debug("command: %s", " ".join(cmd))
        self.process = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=server_environment(),
                                        cwd=self.workdir, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        """Poll ``/v2/health/ready`` until it answers 200; raise with the log tail if the server dies."""
        self._require_started()
        url = f"http://{self._probe_host()}:{self.http_port}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before it was ready; "
                                  f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}")
            if _http_ok(url):
                log.info("tritonserver is ready (pid %d)", self.process.pid)
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout:g} s; "
                          f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the server, SIGKILL it after ``timeout`` s, then kill what is left of its group.

        Returns the server's exit code (None if it was never started).
        """
        if self.process is None:
            return None
        if self._log_file is None:  # stopped already
            return self.process.returncode
        if self.process.poll() is None:
            log.info("stopping tritonserver (pid %d)", self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit within %g s; killing it", timeout)
                self.process.kill()
                self.process.wait()
        kill_group(self.pgid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        code = self.process.returncode
        log.info("tritonserver exited with code %s", code)
        return code

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _log_tail(self.log_path, lines) if self.log_path else ""

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ----------------------------------------------------------------------------------

    def _require_started(self) -> None:
        if self.process is None:
            raise ServerError("the server is not started")

    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else ("::1" if self.host == "::" else self.host)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


# --------------------------------------------------------------------------------------------------
# `distrifusion serve`


def add_serve_command(commands) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``distrifusion`` sub-commands."""
    serve = commands.add_parser("serve", help="serve a Triton model repository with tritonserver")
    serve.add_argument("--repository", required=True, type=Path, help="the Triton model repository folder")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--host", default="0.0.0.0", help="address the HTTP and gRPC endpoints listen on")
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver log verbosity (0: off)")
    serve.add_argument("--workdir", type=Path, default=None,
                       help="folder for the server log and backends (default: a new temporary folder)")
    serve.add_argument("--ready-timeout", type=float, default=300, help="seconds to wait for the models to load")
    serve.set_defaults(handler=serve_command)
    return serve


def serve_command(args: argparse.Namespace) -> int:
    if not args.repository.is_dir():
        print(f"distrifusion serve: error: --repository {args.repository} is not a folder", file=sys.stderr)
        return 2
    server = TritonServer(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, workdir=args.workdir,
                          log_verbose=args.log_verbose)
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve_until_stopped(server, stop_requested, args.ready_timeout)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_until_stopped(server: TritonServer, stop_requested: threading.Event, ready_timeout: float) -> int:
    try:
        server.start()
        server.wait_ready(ready_timeout)
    except ServerError as error:
        print(f"distrifusion serve: error: {error}", file=sys.stderr)
        return 1
    urls = server.urls
    print(f"Triton is serving {server.repository}\n"
          f"  HTTP:    http://{urls['http']}\n"
          f"  gRPC:    {urls['grpc']}\n"
          f"  metrics: {urls['metrics']}\n"
          f"  log:     {server.log_path}\n"
          "Press Ctrl+C to stop.", flush=True)
    while not stop_requested.wait(0.5):
        if not server.is_running():
            print(f"distrifusion serve: error: tritonserver exited with code {server.process.returncode}; "
                  f"last lines of {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
            return 1
    print("Stopping the server ...", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m python_backend.server")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
