"""Where a rank computes: the one home of "auto" device and dtype resolution and CPU threads per rank."""

from __future__ import annotations

import os

import torch

DEVICE_KINDS = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device_kind(name: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "cpu"/"cuda" pass through."""
    if name not in DEVICE_KINDS:
        raise ValueError(f"unknown device {name!r}; allowed: {', '.join(DEVICE_KINDS)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> float16 on CUDA, float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def threads_per_rank(world_size: int, threads: int | None = None) -> int:
    """CPU threads for each of ``world_size`` ranks on this machine: ``threads`` if given, else
    cores / ranks. Every process of a generation uses the same count, so the served image equals the
    command line's bit for bit (the thread count changes float summation order)."""
    if threads is not None:
        return threads
    return max(1, (os.cpu_count() or 1) // world_size)


def set_cpu_threads(world_size: int, threads: int | None = None) -> int:
    count = threads_per_rank(world_size, threads)
    torch.set_num_threads(count)
    return count
