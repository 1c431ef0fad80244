"""NCCL on GPUs: the same code as the gloo tests, run where GPUs exist (scripts/run_gpu_tests.sh)."""

import pytest
import torch

from conftest import relative_l2
from python_backend.core.denoise import GenerationRequest
from python_backend.core.parallel import ParallelConfig
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.modes import Mode
from python_backend.core.ranks import run_on_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 NVIDIA GPUs for NCCL ranks, this machine has {GPUS}")
def test_nccl_full_sync_equals_single_gpu(tiny_sdxl):
    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    runs = [(request, ParallelConfig(Mode.FULL_SYNC, 2, split_cfg=False)),
            (request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False))]
    job = GenerationJob(str(tiny_sdxl), runs, decode=False, progress=False, dtype="float32")
    single = run_on_ranks(1, run_generation_job, (job,), device_kind="cuda")
    double = run_on_ranks(2, run_generation_job, (job,), device_kind="cuda")
    assert relative_l2(double[0].latents, single[0].latents) < 1e-3  # TF32/cuDNN choices differ per slab
    assert relative_l2(double[1].latents, single[0].latents) < 0.2


def _has_tensorrt() -> bool:
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_engines_match_onnxruntime(tiny_sdxl, tmp_path):
    from python_backend.engines.build import BuildRequest, build

    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    trt = build(BuildRequest(str(tiny_sdxl), 256, 256, 1, backend="tensorrt", precision="fp16", split_cfg=False),
                tmp_path, progress=False)
    assert list(trt.rglob("*.plan")), "TensorRT engines were built"
    ort = build(BuildRequest(str(tiny_sdxl), 256, 256, 1, split_cfg=False), tmp_path, progress=False)
    gpu_job = GenerationJob(str(tiny_sdxl), [(request, parallel)], decode=False, progress=False, dtype="float16",
                            engine="tensorrt", engine_dir=str(trt))
    cpu_job = GenerationJob(str(tiny_sdxl), [(request, parallel)], decode=False, progress=False, dtype="float32",
                            engine="onnxruntime", engine_dir=str(ort))
    on_gpu = run_on_ranks(1, run_generation_job, (gpu_job,), device_kind="cuda")[0]
    on_cpu = run_on_ranks(1, run_generation_job, (cpu_job,), device_kind="cpu")[0]
    assert relative_l2(on_gpu.latents, on_cpu.latents) < 0.05  # fp16 engines against fp32 ONNX Runtime
