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
:class:`TritonServer` starts ``tritonserver`` in a new session (its own process group) with umask 077
(every file it and its stubs create is readable by this user only; for the Python backend's /dev/shm
regions, which boost chmods to 0644, see :func:`install_fchmod_guard`), with stdout and stderr in
``<workdir>/tritonserver.log``. The stubs, and any processes
they start, stay in that group unless they leave it themselves; after the server exits,
:meth:`TritonServer.stop` kills whatever of the group remains. Before it starts the server,
:meth:`TritonServer.start` removes the Python backend's /dev/shm regions that a crashed run left behind
(:func:`remove_stale_shm_regions`).

Stopping
--------
On SIGTERM tritonserver first waits (up to ``--exit-timeout-secs``) for its open HTTP connections, an
idle keep-alive one included, and only then unloads its models with whatever is left of that time; if
the time runs out it exits 1 at once, ``finalize`` never runs and the stubs are left for the group kill.
So the server runs with ``--model-control-mode=explicit --load-model=*`` (every model loads at start, as
without model control) and :meth:`TritonServer.stop` first unloads every model through the model-control
API (in-flight requests finish, each model's ``finalize`` runs, the stubs exit and remove their regions),
then sends SIGTERM: the server waits at most its exit timeout (:data:`DEFAULT_EXIT_TIMEOUT_S`) for open
connections and exits 0, having no model left to unload.

Security defaults
-----------------
* Every endpoint (HTTP, gRPC, metrics) listens on :data:`DEFAULT_HOST` (127.0.0.1) unless a host is given;
  another address logs a warning (:func:`is_loopback`).
* The APIs the pipeline's clients do not need (:data:`RESTRICTED_APIS`: shared-memory registration,
  logging, trace and model-repository) are restricted over HTTP and gRPC with Triton's
  ``--http-restricted-api`` / ``--grpc-restricted-protocol``: a call must carry the header
  :data:`ADMIN_HTTP_HEADER` (HTTP) or :data:`ADMIN_GRPC_HEADER` (gRPC metadata) with the admin key. The
  key comes from the caller, else from :data:`ADMIN_KEY_ENV_VAR`, else it is random for each start (then
  only this process, which stops the server with it, knows it). See docs/security.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from .access import (  # noqa: F401  (re-exported: the server's security defaults)
    ADMIN_GRPC_HEADER,
    ADMIN_HTTP_HEADER,
    ADMIN_KEY_ENV_VAR,
    ADMIN_KEY_NAME,
    DEFAULT_HOST,
    OPEN_APIS,
    RESTRICTED_APIS,
    check_admin_key,
    exposure_warning,
    is_loopback,
    resolve_admin_key,
)
from .gateway import Gateway, Limits
from .processes import alive, free_ports, group_members, kill_group, wait_group_exit  # noqa: F401  (re-exported)
from .signals import CANCEL_DIR_ENV_VAR, PROGRESS_DIR_ENV_VAR, STATUS_DIR_ENV_VAR, CancelMarkers, state_problems
from .shared_memory import (  # noqa: F401
    LAUNCHER,
    SEMAPHORE_PREFIX,
    SERVER_UMASK,
    SHM_REGION_PREFIX,
    exec_private,
    remove_stale_shm_regions,
    stale_shm_regions,
)

log = logging.getLogger("distrifusion.server")

PYTHON_ENV_VAR = "DISTRIFUSION_PYTHON"
"""Environment variable naming the Python interpreter models must use for worker processes."""
PROJECT_ROOT_ENV_VAR = "DISTRIFUSION_PROJECT_ROOT"
"""Environment variable naming the folder that holds the ``python_backend`` package."""

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding python_backend/
NGC_ROOT = Path("/opt/tritonserver")
LOG_NAME = "tritonserver.log"
LOG_TAIL_LINES = 40
DEFAULT_EXIT_TIMEOUT_S = 1
"""``--exit-timeout-secs``: how long tritonserver waits for open connections (and, were any left,
models) once it gets SIGTERM. :meth:`TritonServer.stop` unloads every model before, so this only bounds
the wait for idle client connections."""
DEFAULT_STOP_TIMEOUT_S = 10.0
"""How long :meth:`TritonServer.stop` may take: unloading, then the server's exit."""
DEFAULT_MAX_REQUEST_BYTES = 4 << 20
"""The gateway's request body limit for a repository without deployment settings (see
``ServingSettings.request_body_limit`` for the one a deployment gets)."""
DEFAULT_MAX_REQUEST_ID_CHARS = 128
STUB_NAME = "triton_python_backend_stub"
HEALTH_INTERVAL_S = 0.5
"""How often ``distrifusion serve`` checks that tritonserver and every loaded model's stub are alive."""
GROUP_EXIT_GRACE_S = 3.0
"""After the server exits, how long what is left of its process group may take to exit on its own
before it is killed."""


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
                 host: str = DEFAULT_HOST, workdir=None, log_verbose: int = 0, extra_args: Sequence[str] = (),
                 admin_key: str | None = None, restricted_apis: Sequence[str] = RESTRICTED_APIS,
                 private_shm: bool = True, gateway: bool = True, max_request_bytes: int | None = None):
        """``admin_key``: the key restricted APIs need (default: :func:`resolve_admin_key`);
        ``restricted_apis``: those restricted (a subset of :data:`RESTRICTED_APIS` opens the others);
        ``private_shm``: start the server through :func:`exec_private` (regions 0600, no_new_privs);
        ``gateway``: put the gateway (``gateway.py``: body limit, cancellation on disconnect, truthful
        readiness) on the HTTP and gRPC ports, tritonserver's own on free loopback ports behind it;
        ``max_request_bytes``: its body limit (default: the deployment's, :func:`repository_limits`)."""
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self.workdir = Path(workdir) if workdir is not None else None
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.admin_key, self.admin_key_source = resolve_admin_key(admin_key)
        unknown = sorted(set(restricted_apis) - set(RESTRICTED_APIS) - set(OPEN_APIS))
        if unknown:
            raise ValueError(f"unknown API(s) {unknown}; Triton's are {RESTRICTED_APIS + OPEN_APIS}")
        self.restricted_apis = tuple(dict.fromkeys(restricted_apis))
        self.private_shm = private_shm
        self.use_gateway = gateway
        deployment = repository_limits(self.repository)
        self.max_request_bytes = max_request_bytes or deployment.request_bytes
        self.max_request_id_chars = deployment.request_id_chars
        self.process: subprocess.Popen | None = None
        self.gateway: Gateway | None = None
        # where tritonserver itself listens: behind the gateway, free loopback ports chosen at start
        self.triton_host, self.triton_http_port, self.triton_grpc_port = host, http_port, grpc_port
        self._python_models = _python_models(self.repository)
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

    @property
    def exit_timeout_s(self) -> int:
        """The server's ``--exit-timeout-secs`` (``extra_args`` may set it)."""
        value = _last_option(self.extra_args, "--exit-timeout-secs")
        return int(value) if value is not None else DEFAULT_EXIT_TIMEOUT_S

    @property
    def explicit_model_control(self) -> bool:
        """Whether models can be unloaded through the API (``extra_args`` may choose another mode)."""
        return _last_option(self.extra_args, "--model-control-mode") in (None, "explicit")

    def admin_headers(self, protocol: str = "http") -> dict:
        """The header a restricted call needs: ``protocol`` "http" or "grpc" (its metadata key)."""
        return {ADMIN_GRPC_HEADER if protocol == "grpc" else ADMIN_HTTP_HEADER: self.admin_key}

    @property
    def cancel_dir(self) -> Path | None:
        return self.workdir / "cancelled" if self.workdir is not None else None

    @property
    def status_dir(self) -> Path | None:
        return self.workdir / "status" if self.workdir is not None else None

    @property
    def progress_dir(self) -> Path | None:
        return self.workdir / "progress" if self.workdir is not None else None

    def command(self, backend_dir: Path) -> list[str]:
        args = [str(find_tritonserver()),
                f"--model-repository={self.repository}",
                f"--backend-directory={backend_dir}",
                f"--http-address={self.triton_host}", f"--http-port={self.triton_http_port}",
                f"--grpc-address={self.triton_host}", f"--grpc-port={self.triton_grpc_port}",
                "--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                f"--log-verbose={self.log_verbose}"]
        if self.restricted_apis:
            apis = ",".join(self.restricted_apis)
            args += [f"--http-restricted-api={apis}:{ADMIN_KEY_NAME}={self.admin_key}",
                     f"--grpc-restricted-protocol={apis}:{ADMIN_KEY_NAME}={self.admin_key}"]
        if _last_option(self.extra_args, "--model-control-mode") is None:
            args.append("--model-control-mode=explicit")
            if _last_option(self.extra_args, "--load-model") is None:
                args.append("--load-model=*")  # every model at start, as without model control
        if _last_option(self.extra_args, "--exit-timeout-secs") is None:
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
        if self.use_gateway:
            self.triton_host = DEFAULT_HOST
            self.triton_http_port, self.triton_grpc_port = free_ports(2)
        for folder in (self.cancel_dir, self.status_dir, self.progress_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(mode=0o700)
        cmd = self.command(prepare_backend_dir(self.workdir))
        if not is_loopback(self.host):
            log.warning("warning: %s", exposure_warning(self.host))
        remove_stale_shm_regions(self._shm_region_prefix())
        remove_stale_shm_regions(SEMAPHORE_PREFIX)  # unmapped by every process: nobody can be using them
        env = server_environment()
        env.pop(ADMIN_KEY_ENV_VAR, None)  # the server has it on its command line; its models need not
        env[STATUS_DIR_ENV_VAR] = str(self.status_dir)
        env[PROGRESS_DIR_ENV_VAR] = str(self.progress_dir)
        env[CANCEL_DIR_ENV_VAR] = str(self.cancel_dir)  # the gateway and pipeline_stream mark cancellations
        self._log_file = open(self.log_path, "wb")
        log.info("starting tritonserver for %s (log: %s)", self.repository, self.log_path)
        log.debug("command: %s", " ".join(c.replace(self.admin_key, "<admin key>") for c in cmd))
        if self.private_shm:  # through the launcher (exec_private), which becomes tritonserver: same pid
            cmd = [sys.executable, "-c", LAUNCHER, *cmd]
        self.process = subprocess.Popen(cmd, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        cwd=self.workdir, start_new_session=True, umask=SERVER_UMASK)
        if self.use_gateway:
            try:
                self.gateway = Gateway(self.host, self.http_port, self.grpc_port, self.triton_host,
                                       self.triton_http_port, self.triton_grpc_port,
                                       Limits(self.max_request_bytes, self.max_request_id_chars),
                                       CancelMarkers(self.cancel_dir), readiness=self.health_problems).start()
            except BaseException:
                self.stop()
                raise
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

    def health_problems(self) -> list[str]:
        """Why the deployment cannot serve although tritonserver may say it is ready (empty: none):
        tritonserver exited, a loaded Python model has no live stub (killed; Triton 2.51 would hang its
        requests), or a model's rank group is (re)starting, failed or lost a worker."""
        if not self.is_running():
            return ["tritonserver is not running"]
        try:
            loaded = self.loaded_python_models()
        except (OSError, ValueError, KeyError):
            return ["tritonserver does not answer"]
        stubs = self.stub_processes()
        problems = [f"model '{name}': its Python backend stub process has exited"
                    for name in loaded if name not in stubs]
        return problems + state_problems(self.status_dir, alive)

    def loaded_python_models(self) -> list[str]:
        """The Python models tritonserver has loaded (READY), from its repository index."""
        return sorted({m["name"] for m in self._repository_index() if m.get("state") == "READY"}
                      & self._python_models)

    def stub_processes(self) -> dict[str, list[int]]:
        """Live Python backend stubs of the server by model name."""
        found: dict[str, list[int]] = {}
        for pid in group_members(self.pgid) if self.pgid else []:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if Path(os.fsdecode(argv[0])).name == STUB_NAME and len(argv) > 1:
                found.setdefault(Path(os.fsdecode(argv[1])).parent.parent.name, []).append(pid)
        return found

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """Stops the server cleanly in about ``timeout`` s, open client connections or not: unloads every
        model through the model-control API (in-flight requests finish, each ``finalize`` runs), then
        SIGTERM (the server waits at most its exit timeout for open connections and exits 0); SIGKILL if
        it has not exited by then, and kill what is left of its group.

        Returns the server's exit code (None if it was never started).
        """
        if self.process is None:
            return None
        if self._log_file is None:  # stopped already
            return self.process.returncode
        if self.process.poll() is None:
            started = time.monotonic()
            exit_wait = self.exit_timeout_s + 2.0  # the server's own wait after SIGTERM, and its exit
            if self.explicit_model_control:  # a longer exit timeout asked for: as long a wait here
                self.unload_models(max(timeout - exit_wait, float(self.exit_timeout_s), 1.0))
            self._stop_gateway()  # closes its connections to tritonserver too: nothing left to wait for
            log.info("stopping tritonserver (pid %d)", self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            wait = max(timeout - (time.monotonic() - started), exit_wait)
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit within %g s; killing it", wait)
                self.process.kill()
                self.process.wait()
        self._stop_gateway()
        wait_group_exit(self.pgid, GROUP_EXIT_GRACE_S)  # let resource trackers unlink what they track
        kill_group(self.pgid)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        code = self.process.returncode
        log.info("tritonserver exited with code %s", code)
        return code

    def unload_models(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> bool:
        """Unloads every loaded model (model-control API, with the admin key) and waits up to ``timeout`` s
        until none is loaded or unloading; returns whether that happened."""
        deadline = time.monotonic() + timeout
        try:
            live = [m["name"] for m in self._repository_index() if m.get("state") in _LIVE_STATES]
            for name in live:  # each returns once the model takes no new requests; unloading goes on
                self._admin_post(f"/v2/repository/models/{urllib.parse.quote(name)}/unload",
                                 max(deadline - time.monotonic(), 0.5))
            while True:
                left = [m["name"] for m in self._repository_index() if m.get("state") in _LIVE_STATES]
                if not left:
                    log.info("unloaded %d model(s)", len(live))
                    return True
                if time.monotonic() > deadline:
                    log.warning("model(s) %s still loaded after %g s", left, timeout)
                    return False
                time.sleep(0.1)
        except (OSError, ValueError, KeyError) as error:  # urllib's errors are OSErrors
            log.warning("could not unload the models: %s", error)
            return False

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

    def _stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None

    def _require_started(self) -> None:
        if self.process is None:
            raise ServerError("the server is not started")

    def _probe_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else ("::1" if self.host == "::" else self.host)

    def _admin_post(self, path: str, timeout: float = 5.0) -> bytes:
        host = self._probe_host() if not self.use_gateway else self.triton_host
        request = urllib.request.Request(f"http://{_url_host(host)}:{self.triton_http_port}{path}",
                                         data=b"{}", method="POST", headers=self.admin_headers("http"))
        with urllib.request.urlopen(request, timeout=min(timeout, 5.0)) as response:
            return response.read()

    def _repository_index(self) -> list[dict]:
        return json.loads(self._admin_post("/v2/repository/index"))

    def _shm_region_prefix(self) -> str:
        for arg in self.extra_args:
            if arg.startswith("--backend-config=python,shm-region-prefix-name="):
                return arg.split("=", 2)[2]
        return SHM_REGION_PREFIX


_LIVE_STATES = ("READY", "LOADING", "UNLOADING")


def _python_models(repository: Path) -> set[str]:
    """The models of ``repository`` that the Python backend runs (each needs a live stub)."""
    found = set()
    for config in repository.glob("*/config.pbtxt"):
        try:
            if re.search(r'backend:\s*"python"', config.read_text()):
                found.add(config.parent.name)
        except OSError:
            continue
    return found


def repository_limits(repository: Path) -> Limits:
    """The gateway's limits for the deployment in ``repository`` (its settings' ``request_body_limit`` and
    ``max_request_id_chars``); the defaults for a repository without deployment settings."""
    from .settings import ServingSettings

    settings = ServingSettings.read_repository(repository)
    if settings is None:
        return Limits(DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_ID_CHARS)
    return Limits(settings.request_body_limit(), settings.max_request_id_chars)


def repository_body_limit(repository: Path) -> int:
    """The request body limit of the deployment in ``repository`` (see :func:`repository_limits`)."""
    return repository_limits(repository).request_bytes


def _last_option(args: Sequence[str], name: str) -> str | None:
    """The value of the last ``name=value`` or ``name value`` in ``args`` (None if absent)."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1:]
        elif arg == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address the HTTP, gRPC and metrics endpoints listen on (default {DEFAULT_HOST}: this "
                            "host only; 0.0.0.0 exposes them to other hosts, see docs/security.md)")
    serve.add_argument("--admin-key-file", type=Path, default=None,
                       help=f"file whose first line is the key the restricted APIs ({', '.join(RESTRICTED_APIS)}) "
                            f"need in the '{ADMIN_HTTP_HEADER}' header (default: ${ADMIN_KEY_ENV_VAR}, else a random "
                            "key: nobody can call them)")
    serve.add_argument("--open-api", action="append", choices=RESTRICTED_APIS, default=[], metavar="API",
                       help=f"leave this API open to every client (repeatable; one of {', '.join(RESTRICTED_APIS)})")
    serve.add_argument("--max-request-bytes", type=int, default=None,
                       help="largest request body accepted (HTTP 413 / gRPC RESOURCE_EXHAUSTED above; default: the "
                            "deployment's max_request_bytes, sized for its largest legitimate request)")
    serve.add_argument("--no-gateway", action="store_true",
                       help="let tritonserver listen on the ports itself, without the gateway (no body limit, no "
                            "cancellation when a client disconnects, readiness as Triton reports it)")
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
    try:
        key, source = resolve_admin_key(key_file=getattr(args, "admin_key_file", None))
    except (OSError, ValueError) as error:
        print(f"distrifusion serve: error: --admin-key-file / ${ADMIN_KEY_ENV_VAR}: {error}", file=sys.stderr)
        return 2
    opened = getattr(args, "open_api", [])
    server = TritonServer(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, workdir=args.workdir,
                          log_verbose=args.log_verbose, admin_key=key,
                          restricted_apis=[api for api in RESTRICTED_APIS if api not in opened],
                          gateway=not getattr(args, "no_gateway", False),
                          max_request_bytes=getattr(args, "max_request_bytes", None))
    server.admin_key_source = source
    stop_requested = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop_requested.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = _serve_until_stopped(server, stop_requested, args.ready_timeout)
    finally:
        stopped = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0 and stopped != 0:
        print(f"distrifusion serve: error: tritonserver exited with code {stopped} on stop; "
              f"last lines of {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    return code


def _serve_until_stopped(server: TritonServer, stop_requested: threading.Event, ready_timeout: float) -> int:
    try:
        server.start()
        server.wait_ready(ready_timeout)
    except ServerError as error:
        print(f"distrifusion serve: error: {error}", file=sys.stderr)
        return 1
    urls = server.urls
    limits = (f"at most {server.max_request_bytes} bytes (gateway)" if server.use_gateway
              else "no limit (--no-gateway)")
    restricted = (f"{', '.join(server.restricted_apis)} need the '{ADMIN_HTTP_HEADER}' header "
                  f"(key: {server.admin_key_source})" if server.restricted_apis else "none")
    print(f"Triton is serving {server.repository}\n"
          f"  HTTP:    http://{urls['http']}\n"
          f"  gRPC:    {urls['grpc']}\n"
          f"  metrics: {urls['metrics']}\n"
          f"  log:     {server.log_path}\n"
          f"  restricted APIs: {restricted}\n"
          f"  request bodies: {limits}\n"
          "Press Ctrl+C to stop.", flush=True)
    while not stop_requested.wait(HEALTH_INTERVAL_S):
        if not server.is_running():
            print(f"distrifusion serve: error: tritonserver exited with code {server.process.returncode}; "
                  f"last lines of {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
            return 1
        try:
            dead = [name for name in server.loaded_python_models() if name not in server.stub_processes()]
        except (OSError, ValueError, KeyError):  # busy or stopping: asked again next time
            dead = []
        if dead and not stop_requested.is_set():
            # Triton would hang such a model's requests while it reports ready: stop, so that the
            # supervisor (docker compose's restart policy, systemd, Kubernetes) starts a fresh deployment
            print(f"distrifusion serve: error: the Python backend stub of model(s) {dead} died; stopping the "
                  "server so that it can be restarted", file=sys.stderr, flush=True)
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
