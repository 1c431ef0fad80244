"""Leftover named semaphores (a killed process's multiprocessing locks) are removed; live ones are not."""

import os
import time
from multiprocessing import synchronize

from python_backend.serving.shared_memory import SEMAPHORE_PREFIX, STALE_REGION_MIN_AGE_S, remove_stale_shm_regions


def _named_semaphore(name: str):
    import _multiprocessing

    return _multiprocessing.SemLock(synchronize.SEMAPHORE, 1, 1, name, False)  # kept: not unlinked


def test_unmapped_semaphores_are_removed_and_mapped_ones_kept():
    stale_name = f"/mp-distrifusion-test-stale-{os.getpid()}"
    live_name = f"/mp-distrifusion-test-live-{os.getpid()}"
    stale = _named_semaphore(stale_name)
    live = _named_semaphore(live_name)
    del stale  # closed and unmapped, as a killed process leaves it
    stale_path, live_path = f"/dev/shm/sem.{stale_name[1:]}", f"/dev/shm/sem.{live_name[1:]}"
    try:
        assert os.path.exists(stale_path) and os.path.exists(live_path)
        time.sleep(STALE_REGION_MIN_AGE_S + 0.5)
        removed = {str(p) for p in remove_stale_shm_regions(SEMAPHORE_PREFIX)}
        assert stale_path in removed and not os.path.exists(stale_path)
        assert live_path not in removed and os.path.exists(live_path)  # this process still maps it
    finally:
        del live
        for path in (stale_path, live_path):
            if os.path.exists(path):
                os.unlink(path)
