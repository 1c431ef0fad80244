"""A long-lived rank group that serves generations one at a time (what the Triton denoiser runs).

Rank 0 lives in the calling process (the Triton model instance); ranks 1..N-1 are worker processes
it starts, one per device. Each request is broadcast to every rank over gloo control groups, all
ranks generate together, and rank 0 returns the result. ``close`` tells the workers to leave and
makes sure they are gone. Nothing here knows about Triton.

Starting (and restarting) the group is not done until every rank has loaded its model and the whole
group has run the warm-up generations: every first-call cost (loading, allocation, kernel selection
for a shape) is paid there, never by a request. Each worker reports over a pipe of its own when it
is about to join the process group and when its model is loaded (or why it could not), so rank 0
waits for slow process starts and model loads with ``start_timeout_s`` and sees a worker that dies
meanwhile at once, while ``rank_timeout_s`` stays the bound of every collective of a request.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from ..core.defaults import DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_SCHEDULER, DEFAULT_WIDTH
from ..core.denoise import (GenerationCancelled, GenerationRefused, GenerationRequest, GenerationResult,
                            PatchParallelDenoiser)
from ..core.devices import set_cpu_threads
from ..core.model import Conditioning
from ..core.parallel import ParallelConfig
from ..core.placement import check_transportable, for_transport
from ..core.ranks import LocalRendezvous, RankGroup
from ..engines.loader import load_denoiser
from .signals import FAILED, READY, RESTARTING, STARTING

log = logging.getLogger("distrifusion.rank_service")


@dataclass(frozen=True)
class RankServiceConfig:
    model: str
    world_size: int = 1
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device_kind: str = "cpu"
    engine: str = "torch"
    engine_dir: str | None = None
    dtype: str = "auto"
    threads: int | None = None  # CPU threads per rank (default: cores / ranks)
    python: str | None = None  # interpreter for worker processes (default: this one)
    rank_timeout_s: float = 60.0  # longest any collective may wait for another rank (a dead or hung rank)
    start_timeout_s: float = 600.0  # longest a worker may take to start and load its model
    # Generations the whole group runs before it takes requests (on every start and restart), so that
    # no request pays a first call's costs; None: one at the default size (see ``warmup_requests``).
    warmup: tuple[GenerationRequest, ...] | None = None


def warmup_requests(sizes=((DEFAULT_HEIGHT, DEFAULT_WIDTH),), guidance: float = DEFAULT_GUIDANCE,
                    scheduler: str = DEFAULT_SCHEDULER) -> tuple[GenerationRequest, ...]:
    """One short generation per size, shaped like the requests to come (guidance decides the batch):
    two steps, run with one synchronous warm-up step, so both the synchronous and the asynchronous
    step paths (and their engines) run once."""
    return tuple(GenerationRequest("warm-up", height=h, width=w, steps=2, guidance=guidance, scheduler=scheduler)
                 for h, w in sizes)


class RankGroupFailed(RuntimeError):
    """A rank died or hung during a request; the group was restarted and the request may be retried."""


def _load(config: RankServiceConfig, ranks: RankGroup) -> PatchParallelDenoiser:
    if config.device_kind == "cpu":
        set_cpu_threads(config.world_size, config.threads)
    return load_denoiser(config.model, ranks, config.parallel, config.dtype, config.engine, config.engine_dir)


JOINING, LOADED = "joining", "loaded"  # what a worker reports to rank 0 while it starts


def _worker_main(rank: int, rendezvous: LocalRendezvous, config: RankServiceConfig, report) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(message)s")
    try:
        report.send(JOINING)
        ranks = RankGroup.join(rank, config.world_size, rendezvous, config.device_kind,
                               config.rank_timeout_s)
        denoiser = _load(config, ranks)
    except BaseException:
        report.send(traceback.format_exc())
        raise
    report.send(LOADED)
    report.close()
    try:
        while True:
            if not _next_request_signalled(ranks):
                break
            message = [None]
            dist.broadcast_object_list(message, src=0, group=ranks.control)
            request, parallel, cond = message[0]
            try:
                denoiser.generate(request, parallel, cond=cond, stoppable=True)
            except GenerationCancelled:
                log.info("generation stopped by rank 0 at a step boundary")  # every rank left at the same one
            except GenerationRefused as refused:
                log.warning("request refused before its first step: %s", refused)  # so did every rank
    finally:
        ranks.close()


def _next_request_signalled(ranks: RankGroup) -> bool:
    """Workers: wait (unbounded) for rank 0's word: 1 = a request follows, 0 = leave."""
    word = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(word, src=0, group=ranks.idle)
    return bool(word.item())


def _signal(ranks: RankGroup, more: bool) -> None:
    dist.broadcast(torch.tensor([1 if more else 0], dtype=torch.int64), src=0, group=ranks.idle)


class RankService:
    def __init__(self, config: RankServiceConfig, on_state=None):
        """``on_state(state, reason, worker_pids)``: told when the group is starting, ready, restarting or
        failed (``signals.STARTING`` ...), e.g. to publish it for the server's readiness."""
        self.config = config
        self.on_state = on_state or (lambda state, reason, workers: None)
        self.workers: list[multiprocessing.Process] = []
        self.denoiser = None
        self.ranks = RankGroup.single()
        self.restarts = 0
        self.last_start_s = 0.0  # how long the last (re)start took, warm-up included
        self._group_ok = False  # False after a start that failed: the next request restarts the group
        self.on_state(STARTING, "", [])
        self._start_group_reporting("start")

    def _start_group_reporting(self, what: str) -> None:
        """``_start_group``, telling ``on_state`` whether the group is ready or why it failed."""
        try:
            self._start_group()
        except BaseException as error:
            self.on_state(FAILED, f"{what} failed: {type(error).__name__}: {error}", [])
            raise
        self.on_state(READY, "", self.worker_pids)

    def _start_group(self) -> None:
        """Starts the workers, joins the group, loads rank 0's model (once) and waits until every rank
        has loaded its own; then the group runs the warm-up generations. Undone if any of it fails."""
        config = self.config
        started, reports = time.perf_counter(), []
        try:
            if config.world_size == 1:
                self.ranks = RankGroup.single("cuda" if config.device_kind == "cuda" else "cpu")
            else:
                reports = self._start_workers()
                self._await_workers(reports, JOINING)  # process start and imports: not bounded by rank_timeout_s
                self.ranks = RankGroup.join(0, config.world_size, self._rendezvous, config.device_kind,
                                            config.rank_timeout_s)
            if self.denoiser is None:
                self.denoiser = _load(config, self.ranks)
            else:  # a restart: rank 0 keeps its loaded model and joins the new group
                self.denoiser.rejoin(self.ranks)
            if self.workers:
                self._await_workers(reports, LOADED)  # the workers load while rank 0 does
            loaded = time.perf_counter()
            self._warm_up()
        except BaseException:
            self._stop_workers(kill=True)
            self.ranks.close()
            raise
        finally:
            for report in reports:
                report.close()
        self._group_ok = True
        self.last_start_s = time.perf_counter() - started
        log.info("rank group of %d ready to serve: started in %.1f s (warm-up %.1f s)", config.world_size,
                 self.last_start_s, time.perf_counter() - loaded)

    def _start_workers(self) -> list:
        config = self.config
        context = multiprocessing.get_context("spawn")
        if config.python:
            context.set_executable(config.python)
        self._rendezvous = LocalRendezvous.create()  # removed by rank 0's ranks.close()
        log.info("starting %d rank worker process(es) for a group of %d", config.world_size - 1, config.world_size)
        self.workers, reports = [], []
        for rank in range(1, config.world_size):
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(target=_worker_main, args=(rank, self._rendezvous, config, send), daemon=True,
                                     name=f"distrifusion-rank-{rank}")
            worker.start()
            send.close()  # the worker holds the only send end: its exit reads as end of file
            self.workers.append(worker)
            reports.append(receive)
        return reports

    def _await_workers(self, reports: list, wanted: str) -> None:
        """Waits (up to ``start_timeout_s``) for every worker to report ``wanted``; raises with the reason
        as soon as one reports a failure or exits."""
        deadline = time.monotonic() + self.config.start_timeout_s
        waiting = dict(enumerate(zip(reports, self.workers), start=1))
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"rank worker(s) {sorted(waiting)} did not report {wanted!r} within "
                                   f"{self.config.start_timeout_s:g} s")
            objects = [o for report, worker in waiting.values() for o in (report, worker.sentinel)]
            multiprocessing.connection.wait(objects, timeout=left)
            for rank, (report, worker) in list(waiting.items()):
                if report.poll():
                    try:
                        message = report.recv()
                    except EOFError:
                        message = None
                    if message == wanted:
                        del waiting[rank]
                        continue
                    if message is None:
                        raise RuntimeError(f"rank worker {rank} exited (code {worker.exitcode}) before it was {wanted}")
                    raise RuntimeError(f"rank worker {rank} failed to start:\n{message}")
                if not worker.is_alive():
                    raise RuntimeError(f"rank worker {rank} exited (code {worker.exitcode}) before it was {wanted}")

    def _warm_up(self) -> None:
        requests = warmup_requests() if self.config.warmup is None else self.config.warmup
        parallel = replace(self.config.parallel, warmup_steps=1)  # one synchronous step, then asynchronous ones
        for request in requests:
            self._run(request, parallel)

    def _run(self, request: GenerationRequest, parallel: ParallelConfig, cond: Conditioning | None = None,
             on_step=None, should_stop=None) -> GenerationResult:
        if self.workers:
            _signal(self.ranks, more=True)  # tiny: never blocks on a stuck worker
            message = (request, parallel, for_transport(cond))  # host tensors: each rank places them itself
            check_transportable(message)
            dist.broadcast_object_list([message], src=0, group=self.ranks.control)
        return self.denoiser.generate(request, parallel, on_step=on_step, cond=cond, should_stop=should_stop,
                                      stoppable=True)

    def generate(self, request: GenerationRequest, cond: Conditioning | None = None,
                 parallel: ParallelConfig | None = None, on_step=None, should_stop=None) -> GenerationResult:
        """Runs one request on every rank. A rank that died (before or during it) or hangs longer than
        ``rank_timeout_s`` fails this request with ``RankGroupFailed`` after the group is restarted."""
        parallel = parallel or self.config.parallel
        self.ensure_ready()
        try:
            return self._run(request, parallel, cond, on_step, should_stop)
        except (GenerationCancelled, GenerationRefused):
            raise  # the group is intact: every rank stopped at the same step, or refused before the first
        except Exception as error:
            if not self.workers:
                raise
            dead = self._dead_workers()
            reason = f"rank worker(s) {dead} died" if dead else f"a rank stopped answering ({error})"
            self._restart(reason)
            raise RankGroupFailed(f"the request failed because {reason}; the rank group was restarted, "
                                  "retry the request") from error

    def ensure_ready(self) -> None:
        """Restarts the group if a worker has exited since the last request (or the last start failed);
        returns once the group is loaded and warm. ``generate`` calls it first; a caller that times its
        requests calls it before it starts the clock, so that a restart does not count as denoising."""
        if not self._group_ok:
            self._restart("the last start of the rank group failed")
        dead = self._dead_workers()
        if dead:
            self._restart(f"rank worker(s) {dead} had exited")

    def needs_restart(self) -> bool:
        """Whether a worker has exited or the last start failed (``ensure_ready`` would restart)."""
        return not self._group_ok or bool(self._dead_workers())

    def _dead_workers(self) -> list[int]:
        return [rank for rank, w in enumerate(self.workers, start=1) if not w.is_alive()]

    def _restart(self, reason: str) -> None:
        """Replaces the group; returns once the new one is loaded and warm (before the failed request
        returns, so the next request finds a group as fast as ever)."""
        log.error("restarting the rank group: %s", reason)
        self.on_state(RESTARTING, reason, [])
        self._group_ok = False
        self._stop_workers(kill=True)
        self.ranks.close()
        self.restarts += 1
        self._start_group_reporting(f"restart after {reason}")
        log.info("rank group of %d restarted (%d restart(s) so far)", self.config.world_size, self.restarts)

    def _stop_workers(self, kill: bool, timeout: float = 10.0) -> None:
        for worker in self.workers:
            if kill:
                worker.kill()
            worker.join(timeout)
            if worker.is_alive():
                log.warning("rank worker %s did not stop in %.0f s; killing it", worker.pid, timeout)
                worker.kill()
                worker.join(1)
        self.workers = []

    @property
    def device(self) -> torch.device:
        """Rank 0's device: where a request's tensors go before they enter the group."""
        return self.ranks.device

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def close(self, timeout: float = 10.0) -> None:
        """Tells every worker to leave and makes sure each is gone within ``timeout`` seconds."""
        if self.workers and not self._dead_workers():
            try:
                _signal(self.ranks, more=False)
            except Exception as error:  # a dead worker must not keep the others alive
                log.warning("could not tell the workers to stop: %s", error)
        self._stop_workers(kill=bool(self._dead_workers()), timeout=timeout)
        self.ranks.close()
