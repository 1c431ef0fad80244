"""Scratch tensors that a layer fills and reads before the next layer runs.

A self-attention's gathered keys and values (every slab's, in rank order) and a convolution's slab
framed by its halo rows are concatenations made in every step and read at once. The workspace keeps
one tensor per (purpose, shape, dtype, device) and hands it to every layer and step that asks for the
same: a steady-state step allocates none of them (what CUDA graph capture wants: fixed addresses). It
is not a speed-up on the CPU: in a steady state the allocator hands back the blocks the previous layer
freed, and the SDXL step measured the same with and without it (docs/sparse_compute_sdxl.md).

The rule that makes sharing safe: whoever asks must be done reading the result before the next call
for the same purpose and shape. The layers that use it read it in the next operation (attention, the
convolution) and keep only what that operation returns; on a GPU those operations run in stream order.
"""

from __future__ import annotations

import torch


class Workspace:
    def __init__(self) -> None:
        self._tensors: dict[tuple, torch.Tensor] = {}
        self._asked: set[tuple] = set()

    def concatenated(self, purpose: str, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """``torch.cat(parts, dim)``, written into the scratch tensor for ``purpose`` and the result's
        shape, dtype and device (made on first use)."""
        first = parts[0]
        shape = list(first.shape)
        shape[dim] = sum(part.shape[dim] for part in parts)
        key = (purpose, tuple(shape), first.dtype, first.device)
        out = self._tensors.get(key)
        if out is None:
            out = self._tensors[key] = torch.empty(shape, dtype=first.dtype, device=first.device)
        self._asked.add(key)
        return torch.cat(parts, dim, out=out)

    def release_unasked(self) -> None:
        """Drops the tensors nobody asked for since the last release (another image size or batch), so
        a deployment that varies its requests does not accumulate them."""
        for key in list(self._tensors):
            if key not in self._asked:
                del self._tensors[key]
        self._asked.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())
