"""``distrifusion doctor``: whether this host can run the GPU path, and what to change if not.

It reads the facts (driver, GPUs, torch and its CUDA, TensorRT and the CUDA it was built for, NCCL,
the Triton server) without starting anything, then checks them against the supported combination
(docs/gpu.md). The checks are a pure function of the facts, so they are tested on CPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# The one supported combination (docs/gpu.md says why): everything on CUDA 13.
SUPPORTED_CUDA_MAJOR = 13
MIN_DRIVER = {12: 525, 13: 580}  # the oldest driver that runs each CUDA major's builds
SUPPORTED_TENSORRT = "10.16"  # tensorrt-cu13==10.16.1.11: strongly typed networks, the last 10.x
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:25.10-py3"  # CUDA 13.0, Python 3.12


@dataclass
class Facts:
    driver: str | None = None  # e.g. "580.65.06"
    gpus: list[str] = field(default_factory=list)
    torch: str = ""
    torch_cuda: str | None = None  # the CUDA torch was built for ("13.0"), None for a CPU build
    nccl: str | None = None
    tensorrt: str | None = None
    tensorrt_cuda: int | None = None  # from the wheel's name: tensorrt-cu12 / tensorrt-cu13
    triton: str | None = None  # the server's version, where one is installed
    triton_cuda: str | None = None  # CUDA_VERSION of an NGC image


@dataclass(frozen=True)
class Finding:
    ok: bool
    what: str
    fix: str = ""


def collect() -> Facts:
    import torch

    facts = Facts(torch=torch.__version__, torch_cuda=torch.version.cuda)
    facts.driver = _driver_version()
    if torch.cuda.is_available():
        facts.gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            facts.nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # a build without NCCL
            facts.nccl = None
    for name, cuda in (("tensorrt-cu13", 13), ("tensorrt-cu12", 12), ("tensorrt", None)):
        try:
            facts.tensorrt = importlib.metadata.version(name)
            facts.tensorrt_cuda = cuda
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    facts.triton, facts.triton_cuda = _triton()
    return facts


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def _triton() -> tuple[str | None, str | None]:
    """An NGC image's server (/opt/tritonserver/TRITON_VERSION, CUDA_VERSION) or the pytriton wheel's."""
    ngc = Path("/opt/tritonserver/TRITON_VERSION")
    if ngc.is_file():
        return ngc.read_text().strip(), os.environ.get("CUDA_VERSION")
    try:
        return f"2.51.0 (the nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')} wheel's)", None
    except importlib.metadata.PackageNotFoundError:
        return None, None


def _major(version: str | None) -> int | None:
    found = re.match(r"(\d+)", version or "")
    return int(found.group(1)) if found else None


def check(facts: Facts, ranks: int = 1, engines: bool = True) -> list[Finding]:
    """Every check of ``facts`` for serving on ``ranks`` GPUs (with TensorRT engines if ``engines``)."""
    findings = []
    torch_major = _major(facts.torch_cuda)
    if torch_major is None:
        findings.append(Finding(False, f"torch {facts.torch} is a CPU build",
                                f"install torch's CUDA {SUPPORTED_CUDA_MAJOR} build: pip install torch==2.13.0 "
                                "--index-url https://download.pytorch.org/whl/cu130"))
    elif torch_major != SUPPORTED_CUDA_MAJOR:
        findings.append(Finding(False, f"torch {facts.torch} is built for CUDA {facts.torch_cuda}",
                                f"use torch's CUDA {SUPPORTED_CUDA_MAJOR} build, the CUDA of the supported "
                                "TensorRT and Triton image"))
    else:
        findings.append(Finding(True, f"torch {facts.torch}, CUDA {facts.torch_cuda}"))
    driver = _major(facts.driver)
    needed = MIN_DRIVER.get(torch_major or SUPPORTED_CUDA_MAJOR, MIN_DRIVER[SUPPORTED_CUDA_MAJOR])
    if driver is None:
        findings.append(Finding(False, "no NVIDIA driver found (nvidia-smi)",
                                f"install NVIDIA driver >= {needed} (and the NVIDIA Container Toolkit for compose)"))
    elif driver < needed:
        findings.append(Finding(False, f"NVIDIA driver {facts.driver} is older than {needed}",
                                f"CUDA {torch_major or SUPPORTED_CUDA_MAJOR} builds need driver >= {needed}: "
                                "upgrade the driver"))
    else:
        findings.append(Finding(True, f"NVIDIA driver {facts.driver}"))
    if len(facts.gpus) < ranks:
        findings.append(Finding(False, f"{len(facts.gpus)} GPU(s) visible, {ranks} rank(s) wanted",
                                "serve on as many ranks as GPUs (--ranks), or make the GPUs visible "
                                "(CUDA_VISIBLE_DEVICES, compose's device reservation)"))
    else:
        findings.append(Finding(True, f"{len(facts.gpus)} GPU(s): {', '.join(facts.gpus) or '-'}"))
    if ranks > 1:
        findings.append(Finding(facts.nccl is not None, f"NCCL {facts.nccl}" if facts.nccl else "torch has no NCCL",
                                "" if facts.nccl else "use a CUDA build of torch on Linux (it brings NCCL)"))
    if engines:
        if facts.tensorrt is None:
            findings.append(Finding(False, "TensorRT is not installed",
                                    f"pip install -e '.[gpu]' (tensorrt-cu{SUPPORTED_CUDA_MAJOR} {SUPPORTED_TENSORRT})"))
        elif not facts.tensorrt.startswith(SUPPORTED_TENSORRT + ".") or facts.tensorrt_cuda != SUPPORTED_CUDA_MAJOR:
            findings.append(Finding(False, f"TensorRT {facts.tensorrt} (CUDA {facts.tensorrt_cuda or 'unknown'})",
                                    f"install the supported tensorrt-cu{SUPPORTED_CUDA_MAJOR} {SUPPORTED_TENSORRT} "
                                    "(pip install -e '.[gpu]'); engines built by another release do not load"))
        else:
            findings.append(Finding(True, f"TensorRT {facts.tensorrt} for CUDA {facts.tensorrt_cuda}"))
    if facts.triton_cuda is not None and _major(facts.triton_cuda) != SUPPORTED_CUDA_MAJOR:
        findings.append(Finding(False, f"Triton image on CUDA {facts.triton_cuda}",
                                f"use {TRITON_IMAGE} (the Dockerfile's image)"))
    elif facts.triton:
        findings.append(Finding(True, f"Triton {facts.triton}"
                                + (f", CUDA {facts.triton_cuda}" if facts.triton_cuda else "")))
    return findings


def report(findings: list[Finding]) -> tuple[str, bool]:
    lines = [f"{'ok  ' if f.ok else 'FAIL'} {f.what}" + ("" if f.ok else f"\n     -> {f.fix}") for f in findings]
    ready = all(f.ok for f in findings)
    lines.append("verdict: this host can run the GPU path" if ready else
                 "verdict: this host cannot run the GPU path yet (see FAIL lines)")
    return "\n".join(lines), ready


def doctor(args) -> int:
    text, ready = report(check(collect(), ranks=args.ranks, engines=not args.no_engines))
    print(text)
    return 0 if ready else 1
