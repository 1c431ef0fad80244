"""The long-lived rank group behind the Triton denoiser, without Triton."""

import numpy as np

from conftest import relative_l2
from python_backend.core.denoise import GenerationRequest
from python_backend.core.parallel import ParallelConfig
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.modes import Mode
from python_backend.serving.rank_service import RankService, RankServiceConfig
from python_backend.core.ranks import run_on_ranks


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


import os
import signal
import time

import pytest

from python_backend.serving.rank_service import RankGroupFailed


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_failed_rank_fails_only_its_request_and_the_group_recovers(tiny_sdxl, fault):
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 1, split_cfg=False)
    request = GenerationRequest("a lighthouse", height=128, width=128, steps=6, seed=1)
    service = RankService(RankServiceConfig(str(tiny_sdxl), world_size=2, parallel=parallel, rank_timeout_s=5))
    try:
        solo = service.generate(request).latents.numpy()
        victim = service.worker_pids[0]

        def strike(step, synchronous):
            if step == 2:
                os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)

        started = time.monotonic()
        with pytest.raises(RankGroupFailed, match="restarted, retry"):
            service.generate(request, on_step=strike)
        noticed = time.monotonic() - started
        assert noticed < 5 + 20, f"took {noticed:.1f} s to notice and restart"
        assert service.restarts == 1 and victim not in service.worker_pids
        after = service.generate(request).latents.numpy()
        np.testing.assert_array_equal(after, solo)
    finally:
        service.close()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)


def test_a_cancelled_request_stops_every_rank_at_a_step_boundary(tiny_sdxl):
    from python_backend.core.denoise import GenerationCancelled

    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    request = GenerationRequest("a harbour", height=128, width=128, steps=8, seed=3)
    other = GenerationRequest("a meadow", height=128, width=128, steps=5, seed=4)
    service = RankService(RankServiceConfig(str(tiny_sdxl), world_size=2, parallel=parallel))
    try:
        solo = service.generate(other).latents.numpy()
        steps_run = []
        with pytest.raises(GenerationCancelled, match="stopped after step 3 of 8"):
            service.generate(request, on_step=lambda i, s: steps_run.append(i),
                             should_stop=lambda: len(steps_run) >= 3)
        assert steps_run == [0, 1, 2]
        assert service.restarts == 0  # cancelling is not a failure: the group stays
        np.testing.assert_array_equal(service.generate(other).latents.numpy(), solo)
    finally:
        service.close()
