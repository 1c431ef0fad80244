import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from python_backend.embedded.tiny_model import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from python_backend.embedded.tiny_model import write_tiny_sd15

    return write_tiny_sd15(tmp_path_factory.mktemp("models") / "tiny-sd15", seed=0)


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def rank_workers(server) -> list[int]:
    """Pids of the rank worker processes (multiprocessing spawn children) in a server's process group."""
    from python_backend.serving.server import group_members

    workers = []
    for pid in group_members(server.pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing.spawn" in f.read():
                    workers.append(pid)
        except OSError:
            continue  # the process exited while we looked
    return workers
