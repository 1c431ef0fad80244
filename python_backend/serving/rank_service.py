"""A long-lived rank group that serves generations one at a time (what the Triton denoiser runs).

Rank 0 lives in the calling process (the Triton model instance); ranks 1..N-1 are worker processes
it starts, one per device. Each request is broadcast to every rank over gloo control groups, all
ranks generate together, and rank 0 returns the result. ``close`` tells the workers to leave and
makes sure they are gone. Nothing here knows about Triton.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..core.denoise import GenerationCancelled, GenerationRequest, GenerationResult, PatchParallelDenoiser
from ..core.devices import set_cpu_threads
from ..core.model import Conditioning
from ..core.parallel import ParallelConfig
from ..core.ranks import RankGroup, free_port
from ..engines.loader import load_denoiser

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


class RankGroupFailed(RuntimeError):
    """A rank died or hung during a request; the group was restarted and the request may be retried."""


def _load(config: RankServiceConfig, ranks: RankGroup) -> PatchParallelDenoiser:
    if config.device_kind == "cpu":
        set_cpu_threads(config.world_size, config.threads)
    return load_denoiser(config.model, ranks, config.parallel, config.dtype, config.engine, config.engine_dir)


def _worker_main(rank: int, port: int, config: RankServiceConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(message)s")
    ranks = RankGroup.join(rank, config.world_size, "127.0.0.1", port, config.device_kind, config.rank_timeout_s)
    denoiser = _load(config, ranks)
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
                pass  # rank 0 stopped it; every rank left at the same step boundary
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
    def __init__(self, config: RankServiceConfig):
        self.config = config
        self.workers: list[multiprocessing.Process] = []
        self.denoiser = None
        self.restarts = 0
        self._start_group()
        log.info("rank group of %d ready to serve", config.world_size)

    def _start_group(self) -> None:
        config = self.config
        if config.world_size == 1:
            self.ranks = RankGroup.single("cuda" if config.device_kind == "cuda" else "cpu")
        else:
            context = multiprocessing.get_context("spawn")
            if config.python:
                context.set_executable(config.python)
            port = free_port()
            log.info("starting %d rank worker process(es) for a group of %d", config.world_size - 1, config.world_size)
            self.workers = []
            for rank in range(1, config.world_size):
                worker = context.Process(target=_worker_main, args=(rank, port, config), daemon=True,
                                         name=f"distrifusion-rank-{rank}")
                worker.start()
                self.workers.append(worker)
            self.ranks = RankGroup.join(0, config.world_size, "127.0.0.1", port, config.device_kind,
                                        config.rank_timeout_s)
        if self.denoiser is None:
            self.denoiser = _load(config, self.ranks)
        else:  # a restart: rank 0 keeps its loaded model and joins the new group
            self.denoiser.rejoin(self.ranks)

    def generate(self, request: GenerationRequest, cond: Conditioning | None = None,
                 parallel: ParallelConfig | None = None, on_step=None, should_stop=None) -> GenerationResult:
        """Runs one request on every rank. A rank that died (before or during it) or hangs longer than
        ``rank_timeout_s`` fails this request with ``RankGroupFailed`` after the group is restarted."""
        parallel = parallel or self.config.parallel
        dead = self._dead_workers()
        if dead:
            self._restart(f"rank worker(s) {dead} had exited")
        try:
            if self.workers:
                _signal(self.ranks, more=True)  # tiny: never blocks on a stuck worker
                dist.broadcast_object_list([(request, parallel, cond)], src=0, group=self.ranks.control)
            return self.denoiser.generate(request, parallel, on_step=on_step, cond=cond, should_stop=should_stop,
                                          stoppable=True)
        except GenerationCancelled:
            raise  # the group is intact: every rank stopped at the same step
        except Exception as error:
            if not self.workers:
                raise
            dead = self._dead_workers()
            reason = f"rank worker(s) {dead} died" if dead else f"a rank stopped answering ({error})"
            self._restart(reason)
            raise RankGroupFailed(f"the request failed because {reason}; the rank group was restarted, "
                                  "retry the request") from error

    def _dead_workers(self) -> list[int]:
        return [rank for rank, w in enumerate(self.workers, start=1) if not w.is_alive()]

    def _restart(self, reason: str) -> None:
        log.error("restarting the rank group: %s", reason)
        self._stop_workers(kill=True)
        self.ranks.close()
        self.restarts += 1
        self._start_group()
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
