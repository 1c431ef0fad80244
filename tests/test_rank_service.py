"""The long-lived rank group behind the Triton denoiser, without Triton."""

import multiprocessing
import multiprocessing.spawn
import os
import signal
import statistics
import time

import numpy as np
import pytest

from conftest import TINY_RANKS, TINY_SIZE, relative_l2
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.denoise import GenerationCancelled, GenerationRequest
from python_backend.core.modes import Mode
from python_backend.core.parallel import ParallelConfig
from python_backend.core.ranks import run_on_ranks
from python_backend.serving.rank_service import RankGroupFailed, RankService, RankServiceConfig, warmup_requests


def _service(model, parallel, **options) -> RankService:
    """Two ranks warmed up at the tests' size (as the denoiser model warms up at its built sizes)."""
    return RankService(RankServiceConfig(str(model), world_size=TINY_RANKS, parallel=parallel, text_encoders=True,
                                         warmup=warmup_requests([(TINY_SIZE, TINY_SIZE)]), **options))


def _request(prompt, steps, seed, **options) -> GenerationRequest:
    return GenerationRequest(prompt, height=TINY_SIZE, width=TINY_SIZE, steps=steps, seed=seed, **options)


def _timed(service, request, **options) -> tuple[np.ndarray, float]:
    started = time.monotonic()
    latents = service.generate(request, **options).latents.numpy()
    return latents, time.monotonic() - started


def test_rank_service_serves_requests_one_after_another(tiny_sdxl):
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    first = _request("a lighthouse", steps=4, seed=1)
    second = GenerationRequest("a forest", height=2 * TINY_SIZE, width=TINY_SIZE, steps=5, seed=2, scheduler="ddim")
    service = _service(tiny_sdxl, parallel)
    try:
        served = [service.generate(r).latents.numpy() for r in (first, second, first)]
        pids = service.worker_pids
    finally:
        service.close()
    job = GenerationJob(str(tiny_sdxl), [(first, parallel), (second, parallel)], decode=False, progress=False)
    alone = [o.latents for o in run_on_ranks(TINY_RANKS, run_generation_job, (job,))]
    assert relative_l2(served[0], alone[0]) < 1e-6
    assert relative_l2(served[1], alone[1]) < 1e-6
    np.testing.assert_array_equal(served[2], served[0])  # nothing carried over between requests (nor the warm-up)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # no worker left running after close()


RANK_TIMEOUT = 5.0


# a killed rank 0 through the served path: tests/test_faults.py
@pytest.mark.parametrize("fault, victim_rank", [("killed", 1), ("hung", 1)])
def test_a_failed_rank_fails_only_its_request_and_the_next_is_exact_and_as_fast(tiny_sdxl, fault, victim_rank):
    """The group restarts inside the failed request, and is loaded and warm before it returns: the
    next request (like the first one after the start) costs what any other does. Rank 0 is a worker
    like the others: killing it costs the request, not the process that serves."""
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 1, split_cfg=False)
    request = _request("a lighthouse", steps=8, seed=1)  # about a second here: timing noise is small beside it
    service = _service(tiny_sdxl, parallel, rank_timeout_s=RANK_TIMEOUT)
    try:
        solo, first = _timed(service, request)
        before = [_timed(service, request)[1] for _ in range(3)]
        victim = service.worker_pids[victim_rank]

        def strike(report):
            if report.index == 2:
                os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)

        started = time.monotonic()
        with pytest.raises(RankGroupFailed, match="restarted, retry"):
            service.generate(request, on_step=strike)
        noticed = time.monotonic() - started - service.last_start_s
        # a dead rank is noticed at once, a hung one once a collective has waited RANK_TIMEOUT
        assert noticed < 2 * RANK_TIMEOUT + 10, f"took {noticed:.1f} s to notice, besides the restart"
        assert service.restarts == 1 and victim not in service.worker_pids
        after, seconds = _timed(service, request)
        later = [_timed(service, request)[1] for _ in range(2)]
        np.testing.assert_array_equal(after, solo)
    finally:
        service.close()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    # against the slower of the steady phases before and after, so a neighbour's load is not blamed
    steady = max(statistics.median(before), statistics.median(later))
    assert first < 3 * steady, f"first request after the start: {first:.2f} s, steady: {steady:.2f} s"
    assert seconds < 3 * steady, f"first request after the restart: {seconds:.2f} s, steady: {steady:.2f} s"


def test_a_cancelled_request_stops_every_rank_at_a_step_boundary(tiny_sdxl):
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    request = _request("a harbour", steps=8, seed=3)
    other = _request("a meadow", steps=5, seed=4)
    service = _service(tiny_sdxl, parallel)
    try:
        solo = service.generate(other).latents.numpy()
        steps_run = []
        with pytest.raises(GenerationCancelled, match="stopped after step 3 of 8"):
            service.generate(request, on_step=lambda report: steps_run.append(report.index),
                             should_stop=lambda: len(steps_run) >= 3)
        assert steps_run == [0, 1, 2]
        assert service.restarts == 0  # cancelling is not a failure: the group stays
        np.testing.assert_array_equal(service.generate(other).latents.numpy(), solo)
    finally:
        service.close()


def test_a_worker_that_dies_while_starting_fails_the_start_at_once(tiny_sdxl, tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    started = time.monotonic()
    executable = multiprocessing.spawn.get_executable()  # the interpreter is process-wide: put it back
    try:
        with pytest.raises(RuntimeError, match="rank worker \\d exited \\(code 3\\) before it was joining"):
            RankService(RankServiceConfig(str(tiny_sdxl), world_size=TINY_RANKS, python=str(broken)))
    finally:
        multiprocessing.set_executable(executable)
    assert time.monotonic() - started < 60  # seen when it exits, not after a timeout


def test_nccl_ranks_end_their_process_on_a_collective_timeout_unless_the_environment_chooses():
    from python_backend.core.ranks import NCCL_FAULT_HANDLING, use_nccl_fault_handling

    environ = {}
    assert use_nccl_fault_handling(environ) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"} == NCCL_FAULT_HANDLING
    assert environ == NCCL_FAULT_HANDLING
    chosen = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert use_nccl_fault_handling(chosen) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
