"""Per-rank state of one generation: which step runs, in which mode, and where each patch-aware
layer gets the other slabs' data from (fresh, stale or frozen). Layers ask; the exchange delivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from . import patch_math
from .layout import PatchLayout
from .modes import ASYNC_GROUP_NORM, DEFAULT_MODE, DEFAULT_WARMUP_STEPS, GroupNormSource, Mode
from .parallel import synchronous_steps
from .transport import BufferTransport
from .tracing import building_a_graph
from .workspace import Workspace


class TextKeyValueSource(Protocol):
    def key_value(self, layer: str, attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention layer ``layer``'s text keys and values."""


@dataclass
class PatchContext:
    layout: PatchLayout
    exchange: BufferTransport
    mode: Mode = DEFAULT_MODE
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    step: int = 0
    generation: int = 0  # counts generations: what is cached per generation is keyed by it
    # Where cross-attention layers take their text keys and values instead of their per-generation cache:
    # set only while segment graphs are exported, where they are graph inputs (engines/segments.py)
    text_key_values: TextKeyValueSource | None = None
    # Scratch for the concatenations layers make and read at once (gathered keys and values, halo frames);
    # None: fresh tensors each time (a one-shot pass such as the VAE decoder, whose many shapes are not
    # worth keeping between requests)
    workspace: Workspace | None = field(default_factory=Workspace, repr=False, compare=False)
    _weights_on: dict = field(default_factory=dict, repr=False, compare=False)  # (weights, device) -> tensor

    def begin_generation(self) -> None:
        self.exchange.reset()
        if self.workspace is not None:
            self.workspace.release_unasked()
        self.generation += 1
        self.step = 0
        self.exchange.step = 0

    def begin_step(self, step: int) -> None:
        self.step = step
        self.exchange.step = step

    def end_generation(self) -> None:
        self.exchange.drain()

    @property
    def isolated(self) -> bool:
        """``naive_patch``: every step, each slab sees nothing of the others (zero padding at its borders,
        attention and GroupNorm over its own rows): the seams displaced patch parallelism removes."""
        return self.mode is Mode.NAIVE_PATCH

    @property
    def alone(self) -> bool:
        """Nothing to borrow from other slabs: ``naive_patch`` (they ignore each other) or a single slab
        (the whole map). Layers then compute as the unpatched layer would on this slab, and nothing is
        published."""
        return self.isolated or self.layout.num_patches == 1

    @property
    def synchronous(self) -> bool:
        if self.isolated:
            return False
        return self.mode is Mode.FULL_SYNC or self.step < synchronous_steps(self.warmup_steps)

    @property
    def index(self) -> int:
        return self.layout.index

    def activations(self, key: str, fresh: torch.Tensor, shapes: list[tuple[int, ...]],
                    neighbours_only: bool = False) -> list[torch.Tensor]:
        """Every slab's published activations for this layer; this rank's slot is always ``fresh``
        (``alone``: only ``fresh``, nothing is published). ``neighbours_only``: the layer reads only the
        slabs just above and below (halo rows), so a transport that can route may send them only there
        (the other slots then hold zeros)."""
        if self.alone:
            return [fresh]
        route = getattr(self.exchange, "route_to_neighbours", None)
        if neighbours_only and route is not None:
            route(key)
        if self.synchronous:
            return self.exchange.gather(key, fresh, shapes)
        stale = self.exchange.latest(key)
        if self.mode is not Mode.NO_SYNC:
            self.exchange.start(key, fresh, shapes)
        return [fresh if r == self.index else t for r, t in enumerate(stale)]

    def concatenated(self, purpose: str, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """``torch.cat(parts, dim)``, into the workspace's scratch tensor for ``purpose`` where there is one
        (see core/workspace.py for who may read it how long); a fresh tensor while a graph is traced."""
        if self.workspace is None or len(parts) == 1 or building_a_graph():
            return torch.cat(parts, dim)
        return self.workspace.concatenated(purpose, parts, dim)

    def group_norm_moments(self, key: str, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance [B, G] for this slab's GroupNorm given its fresh moments [2, B, G]."""
        if self.alone:
            return fresh[0], patch_math.variance(fresh)
        source = GroupNormSource.CURRENT if self.synchronous else ASYNC_GROUP_NORM[self.mode]
        shapes = [tuple(fresh.shape)] * self.layout.num_patches
        if source is GroupNormSource.CURRENT:
            moments = patch_math.weighted_moments(self.exchange.gather(key, fresh, shapes), self.layout.weights())
        elif source is GroupNormSource.LOCAL:
            moments = fresh
        else:
            weights = self._slab_weights(self.layout.weights(), fresh.device)
            stale = self.exchange.latest(key)
            self.exchange.start(key, fresh, shapes)
            mixed = torch.stack([fresh if r == self.index else t for r, t in enumerate(stale)])
            if source is GroupNormSource.CORRECTED:
                moments = patch_math.corrected_moments(torch.stack(stale), fresh, self.index, weights)
                # The corrected E[x^2] - E[x]^2 cancels badly where one slab's mean moved far (an object
                # appearing in it); a variance near zero then multiplies that group's activations
                # (docs/quality.md). The slabs' own variances bound it from below.
                floor = patch_math.VARIANCE_FLOOR_SHARE * patch_math.within_slab_variance(mixed, weights)
                return moments[0], patch_math.corrected_variance(moments, fresh, floor)
            moments = patch_math.weighted_sum(weights, mixed)
        return moments[0], patch_math.variance(moments)

    def _slab_weights(self, weights: list[float], device: torch.device) -> torch.Tensor:
        """``weights`` as a float32 tensor on ``device``, made once per layout and device (not a host copy
        per layer); keyed by the weights themselves, since one context serves several layouts."""
        key = (tuple(weights), device)
        if key not in self._weights_on:
            self._weights_on[key] = torch.tensor(weights, dtype=torch.float32, device=device)
        return self._weights_on[key]
