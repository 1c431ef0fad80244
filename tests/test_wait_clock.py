"""The exchange-wait clock: host time on CPU, CUDA-event time on GPUs (logic tested with stand-in events)."""

import time

import torch

from python_backend.core.wait_clock import WaitClock


class _FakeEvent:
    """Records a fake device timestamp (ms) at record(); elapsed_time like torch.cuda.Event."""

    now_ms = 0.0
    synchronized = 0

    def record(self):
        self.at = _FakeEvent.now_ms

    def elapsed_time(self, other):
        return other.at - self.at

    def synchronize(self):
        _FakeEvent.synchronized += 1


def test_host_waits_are_measured_with_the_host_clock():
    clock = WaitClock()
    token = clock.begin(torch.device("cpu"))
    time.sleep(0.05)
    clock.end(token)
    assert 0.04 < clock.seconds < 1.0
    clock.reset()
    assert clock.seconds == 0.0


def test_device_waits_are_the_events_elapsed_time_read_once_at_the_end():
    clock = WaitClock(event_factory=_FakeEvent)
    for stall_ms in (3.0, 7.0):
        token = clock.begin(torch.device("cuda", 1))  # no GPU needed: only the device type is read
        _FakeEvent.now_ms += stall_ms  # the device stream stalls; the host returned at once
        clock.end(token)
        _FakeEvent.now_ms += 100.0  # compute between waits is not counted
    assert _FakeEvent.synchronized == 0  # nothing synchronised during the steps
    assert abs(clock.seconds - 0.010) < 1e-12
    assert _FakeEvent.synchronized == 1
