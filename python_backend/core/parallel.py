"""How a generation maps onto N ranks: the one home of the CFG-split, slab-count and batch rule.

With classifier-free guidance, an even N >= 2 and the split enabled, the ranks form two patch groups
of N/2 (unconditional first), each running batch ``num_images``; otherwise all N ranks form one patch
group running the whole guided batch (2 x ``num_images``). ``RankGroup.plan``, ``distrifusion build``
(engine shapes and cache key), the command line's checks and the engine set all read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .modes import DEFAULT_MODE, DEFAULT_WARMUP_STEPS, Mode


@dataclass
class ParallelConfig:
    mode: Mode = DEFAULT_MODE
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    split_cfg: bool = True
    exchange_dtype: str = "native"  # how asynchronous exchanges travel (core/exchange_codec.py, --exchange-dtype)


@dataclass(frozen=True)
class GroupShape:
    split: bool  # the two CFG halves run on two patch groups
    patches: int  # slabs per patch group
    batch: int  # UNet batch on each rank


def group_shape(world_size: int, guided: bool, split_cfg: bool, num_images: int = 1) -> GroupShape:
    if world_size < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {world_size}")
    split = guided and split_cfg and world_size >= 2 and world_size % 2 == 0
    patches = world_size // 2 if split else world_size
    batch = num_images * (2 if guided and not split else 1)
    return GroupShape(split=split, patches=patches, batch=batch)


def synchronous_steps(warmup_steps: int) -> int:
    """Warm-up steps that actually run synchronously: an asynchronous step needs one before it to
    borrow from, so 0 behaves as 1."""
    return max(warmup_steps, 1)


