"""Run Triton's ``perf_analyzer`` (shipped in ``tritonclient[all]==2.51.0``) outside the NGC SDK container.

The binary is installed in the Python environment's bin folder (next to ``sys.executable``). It needs two
shared libraries that a plain machine lacks: ``libb64.so.0d`` and ``libcudart.so.12`` (even for HTTP/gRPC
runs without a GPU). Without apt, :func:`perf_analyzer_environment` makes a folder of symlinks to copies
that pip already installed (``nvidia_pytriton.libs/libb64-*.so.0d`` from nvidia-pytriton,
``nvidia/cuda_runtime/lib/libcudart.so.12`` from nvidia-cuda-runtime-cu12) and puts it first on
``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

log = logging.getLogger("distrifusion.server")

LIB_DIR_NAME = "perf_analyzer_libs"


def find_perf_analyzer() -> Path:
    """The ``perf_analyzer`` binary: next to ``sys.executable``, else on PATH."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    if beside.is_file():
        return beside
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return Path(on_path)
    raise FileNotFoundError("perf_analyzer not found: pip install 'tritonclient[all]==2.51.0'")


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(p) for p in dict.fromkeys([paths["purelib"], paths["platlib"]])]


def _first_match(patterns: Sequence[str]) -> Path | None:
    for site in _site_dirs():
        for pattern in patterns:
            found = sorted(site.glob(pattern))
            if found:
                return found[0]
    return None


def _cuda_runtime() -> Path | None:
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "lib" / "libcudart.so.12"
            if candidate.is_file():
                return candidate
    return _first_match(["nvidia/cuda_runtime/lib/libcudart.so.12", "nvidia_pytriton.libs/libcudart-*.so.12*"])


def _library_sources() -> dict[str, Path | None]:
    return {"libb64.so.0d": _first_match(["nvidia_pytriton.libs/libb64-*.so.0d"]),
            "libcudart.so.12": _cuda_runtime()}


def perf_analyzer_environment(workdir) -> dict:
    """The environment for ``perf_analyzer``: ``<workdir>/perf_analyzer_libs`` first on LD_LIBRARY_PATH."""
    lib_dir = Path(workdir) / LIB_DIR_NAME
    lib_dir.mkdir(parents=True, exist_ok=True)
    for name, source in _library_sources().items():
        link = lib_dir / name
        if source is None:
            log.warning("no %s found in site-packages; perf_analyzer may not start", name)
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    env = os.environ.copy()
    present = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(lib_dir), *present])
    return env


def run_perf_analyzer(args: Sequence[str], workdir, timeout: float | None = None,
                      check: bool = True) -> subprocess.CompletedProcess:
    """Run ``perf_analyzer *args`` in ``workdir`` with the right environment; output is captured."""
    cmd = [str(find_perf_analyzer()), *map(str, args)]
    log.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, env=perf_analyzer_environment(workdir), cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, check=check)
