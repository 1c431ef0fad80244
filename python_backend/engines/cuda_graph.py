"""Replaying one engine's enqueue as a CUDA graph (``--cuda-graphs``).

A TensorRT segment is one ``execute_async_v3`` call that launches hundreds of kernels; captured once into
a CUDA graph, every later step launches it with a single ``cudaGraphLaunch``. What a graph fixes, and how
the runner keeps it true (``TensorRTRunner``): the I/O addresses (every input is copied into a buffer of
the runner's own before each launch, and the outputs are allocated once) and the shapes (the engines are
static).

The exchange stays around the graphs, not inside them: NCCL's collectives are launched between segment
calls (``SegmentedUNet``), exactly as without graphs. The capture runs in thread-local mode, because the
process group's watchdog thread queries NCCL's events while a capture is under way, which global mode
forbids ("operation not permitted when stream is capturing"); capturing also synchronises the device once
(``torch.cuda.graph`` does), so no collective is still in flight on the device when it starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("distrifusion.cuda_graph")

CAPTURE_ERROR_MODE = "thread_local"


class CapturedLaunch:
    """Runs ``enqueue(stream)`` directly the first time (TensorRT finishes its lazy set-up in the first
    enqueue, which must not happen inside a capture), captures it into a CUDA graph the second time, and
    replays the graph from then on. ``enqueue`` must read and write the same addresses every time.

    A capture that fails (an engine TensorRT cannot capture, a driver that refuses) is logged once, in
    words, and the launch goes on without a graph: slower, never wrong."""

    def __init__(self, enqueue: Callable[["torch.cuda.Stream"], None], device: torch.device, name: str):
        self.enqueue, self.device, self.name = enqueue, device, name
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.calls = 0
        self.failed = False

    def launch(self, stream: "torch.cuda.Stream") -> None:
        self.calls += 1
        if self.graph is None and not self.failed and self.calls >= 2:
            self._capture()
        if self.graph is None:
            self.enqueue(stream)
            return
        with torch.cuda.stream(stream):
            self.graph.replay()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        capture_stream = _capture_stream(self.device)
        try:
            with torch.cuda.graph(graph, stream=capture_stream, capture_error_mode=CAPTURE_ERROR_MODE):
                self.enqueue(capture_stream)
        except Exception as error:  # noqa: BLE001 - any refusal means: run without a graph
            self.failed = True
            log.warning("could not capture %s in a CUDA graph (%s); it runs without one", self.name, error)
            return
        self.graph = graph
        log.info("captured %s in a CUDA graph: later steps replay it", self.name)


_CAPTURE_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def _capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """A stream of its own per device for captures (a capture may not run on a default stream)."""
    if device.index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device.index] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[device.index]
