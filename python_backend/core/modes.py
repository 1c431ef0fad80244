"""The synchronisation modes of displaced patch parallelism (DESIGN.md, the mode table)."""

from __future__ import annotations

import enum

from .defaults import DEFAULT_MODE_NAME, DEFAULT_WARMUP_STEPS


class Mode(str, enum.Enum):
    FULL_SYNC = "full_sync"
    SYNC_GN = "sync_gn"
    CORRECTED_ASYNC_GN = "corrected_async_gn"
    STALE_GN = "stale_gn"
    SEPARATE_GN = "separate_gn"
    NO_SYNC = "no_sync"
    NAIVE_PATCH = "naive_patch"  # the paper's baseline: each slab denoised alone, as if it were the image

    @classmethod
    def parse(cls, name: str) -> "Mode":
        try:
            return cls(name)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown mode {name!r}; allowed: {allowed}") from None


class GroupNormSource(str, enum.Enum):
    """Where GroupNorm takes the statistics of the other slabs from in an asynchronous step."""

    CURRENT = "current"  # blocking exchange of this step's statistics
    CORRECTED = "corrected"  # stale global + (fresh local - stale local)
    STALE = "stale"  # stale others, own slot fresh
    LOCAL = "local"  # this slab only


ASYNC_GROUP_NORM = {
    Mode.FULL_SYNC: GroupNormSource.CURRENT,
    Mode.SYNC_GN: GroupNormSource.CURRENT,
    Mode.CORRECTED_ASYNC_GN: GroupNormSource.CORRECTED,
    Mode.STALE_GN: GroupNormSource.STALE,
    Mode.SEPARATE_GN: GroupNormSource.LOCAL,
    Mode.NO_SYNC: GroupNormSource.LOCAL,
    Mode.NAIVE_PATCH: GroupNormSource.LOCAL,
}

DEFAULT_MODE = Mode(DEFAULT_MODE_NAME)
__all__ = ["Mode", "GroupNormSource", "ASYNC_GROUP_NORM", "DEFAULT_MODE", "DEFAULT_WARMUP_STEPS"]
