"""`distrifusion doctor` and the GPU test script on a machine without GPUs: the checks say what is wrong,
and a GPU run whose tests skip cannot read as a pass."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from python_backend.cli.doctor import Facts, check, report

REPO = Path(__file__).resolve().parent.parent
GOOD = Facts(driver="580.65.06", gpus=["NVIDIA H200"] * 2, torch="2.13.0+cu130", torch_cuda="13.0", nccl="2.27.7",
             tensorrt="10.16.1.11", tensorrt_cuda=13, triton="2.62.0", triton_cuda="13.0.2")


def _failures(facts, **kwargs):
    return [f.what for f in check(facts, **kwargs) if not f.ok]


def test_the_supported_combination_passes():
    text, ready = report(check(GOOD, ranks=2))
    assert ready, text
    assert "verdict: this host can run the GPU path" in text


@pytest.mark.parametrize("change, ranks, expected", [
    (dict(torch="2.13.0+cpu", torch_cuda=None), 1, "CPU build"),
    (dict(torch_cuda="12.6"), 1, "built for CUDA 12.6"),
    (dict(driver="560.35.03"), 1, "older than 580"),
    (dict(driver=None), 1, "no NVIDIA driver"),
    (dict(gpus=["NVIDIA H200"]), 2, "1 GPU(s) visible, 2 rank(s) wanted"),
    (dict(nccl=None), 2, "no NCCL"),
    (dict(tensorrt=None, tensorrt_cuda=None), 1, "TensorRT is not installed"),
    (dict(tensorrt="10.16.1.11", tensorrt_cuda=12), 1, "TensorRT 10.16.1.11 (CUDA 12)"),
    (dict(tensorrt="11.4.0.106"), 1, "TensorRT 11.4.0.106"),
    (dict(triton_cuda="12.6.3"), 1, "Triton image on CUDA 12.6.3"),
])
def test_each_mismatch_is_named_with_what_to_change(change, ranks, expected):
    findings = check(replace(GOOD, **change), ranks=ranks)
    failed = [f for f in findings if not f.ok]
    assert len(failed) == 1 and expected in failed[0].what, failed
    assert failed[0].fix  # every failure says what to change
    assert not report(findings)[1]


def test_the_eager_path_does_not_need_tensorrt():
    assert _failures(replace(GOOD, tensorrt=None), engines=False) == []


def test_doctor_here_exits_1_naming_the_cpu_build():
    run = subprocess.run([sys.executable, "-m", "python_backend.cli", "doctor", "--ranks", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "is a CPU build" in run.stdout and "cannot run the GPU path" in run.stdout


def test_gpu_test_script_fails_on_a_host_without_gpus():
    run = subprocess.run(["bash", "scripts/run_gpu_tests.sh"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "cannot run the GPU tests" in run.stderr and "FAIL" in run.stdout


def test_require_gpu_turns_a_skipped_gpu_test_into_a_failure():
    env = {**os.environ, "REQUIRE_GPU": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          "tests/test_gpu.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "REQUIRE_GPU=1 and this GPU test was skipped" in run.stdout
    assert " passed" not in run.stdout.splitlines()[-1]
