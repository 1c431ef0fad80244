"""The long-lived rank group behind the Triton denoiser, without Triton."""

import numpy as np

from conftest import relative_l2
from python_backend.denoise import GenerationRequest, ParallelConfig
from python_backend.generate import GenerationJob, run_generation_job
from python_backend.modes import Mode
from python_backend.rank_service import RankService, RankServiceConfig
from python_backend.ranks import run_on_ranks


def test_rank_service_serves_requests_one_after_another(tiny_sdxl):
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    first = GenerationRequest("a lighthouse", height=128, width=128, steps=4, seed=1)
    second = GenerationRequest("a forest", height=256, width=128, steps=5, seed=2, scheduler="ddim")
    service = RankService(RankServiceConfig(str(tiny_sdxl), world_size=2, parallel=parallel))
    try:
        served = [service.generate(r).latents.numpy() for r in (first, second, first)]
        pids = service.worker_pids
    finally:
        service.close()
    job = GenerationJob(str(tiny_sdxl), [(first, parallel), (second, parallel)], decode=False, progress=False)
    alone = [o.latents for o in run_on_ranks(2, run_generation_job, (job,))]
    assert relative_l2(served[0], alone[0]) < 1e-6
    assert relative_l2(served[1], alone[1]) < 1e-6
    np.testing.assert_array_equal(served[2], served[0])  # nothing carried over between requests
    import os

    for pid in pids:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        assert not alive, f"worker {pid} still running after close()"
