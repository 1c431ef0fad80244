"""The interface between patch-aware layers and whatever moves their buffers.

Layers (through ``PatchContext``) only ever call these methods; ``BufferExchange`` implements them
with torch.distributed collectives, the export stand-ins (``SegmentIO``, ``ShapeRecorder``) with graph
inputs and outputs, and the benchmarks with counting or loopback variants. Keeping the math on one
side of this interface and the transport on the other is what lets each be tested alone.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BufferTransport(Protocol):
    step: int  # the denoising step now running (set by the context at every step boundary)

    def gather(self, key: str, tensor: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Every rank's tensor for ``key`` now (blocking); ``shapes`` gives each rank's shape."""

    def start(self, key: str, tensor: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        """Publishes this rank's fresh ``tensor`` for ``key``; it arrives at the other ranks later."""

    def flush(self) -> None:
        """Sends what ``start`` queued (one bundled transfer per block or segment)."""

    def latest(self, key: str) -> list[torch.Tensor] | None:
        """The most recent complete per-rank list for ``key`` (None before the first exchange)."""

    def drain(self) -> None:
        """Completes everything still in flight (end of a generation)."""

    def reset(self) -> None:
        """Forgets every buffer, so nothing carries over into the next generation."""
