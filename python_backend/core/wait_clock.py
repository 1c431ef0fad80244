"""How long a rank was held up waiting for an exchange, measured where the waiting happens.

On gloo (CPU) ``work.wait()`` blocks the host until the collective is done: host clocks around it
measure the wait. On NCCL it returns at once after making the compute stream wait for the
communication stream: the stall happens later, on the device, and only CUDA events recorded on the
compute stream before and after the wait see it. Events are read once, when the total is asked for
(after the generation), so measuring adds no host synchronisation to a step.
"""

from __future__ import annotations

import time

import torch


class WaitClock:
    """Sums the time between ``begin()`` and ``end(token)`` pairs: host time, and device time for work
    on a CUDA device."""

    def __init__(self, event_factory=None):
        # event_factory() -> an object with record() and elapsed_time(other) in ms (torch.cuda.Event);
        # replaceable so that the device-side logic is tested on CPU
        self._event_factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._host_seconds = 0.0
        self._event_pairs: list[tuple[object, object]] = []

    def begin(self, device: torch.device):
        if device.type == "cuda":
            event = self._event_factory()
            event.record()
            return event
        return time.perf_counter()

    def end(self, token) -> None:
        if isinstance(token, float):
            self._host_seconds += time.perf_counter() - token
            return
        event = self._event_factory()
        event.record()
        self._event_pairs.append((token, event))

    @property
    def seconds(self) -> float:
        if self._event_pairs:
            self._event_pairs[-1][1].synchronize()
        device = sum(start.elapsed_time(stop) for start, stop in self._event_pairs) / 1000.0
        return self._host_seconds + device

    def reset(self) -> None:
        self._host_seconds = 0.0
        self._event_pairs.clear()
