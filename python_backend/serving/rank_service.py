"""A long-lived rank group that serves generations one at a time (what the Triton denoiser runs).

Every rank is a worker process (one per device) that the service, in the calling process (the
Triton model instance), starts and supervises; the service holds no rank. It hands each request to
rank 0 over a pipe; rank 0 broadcasts it to the other ranks over gloo control groups, all ranks
generate together, rank 0 reports every step and sends back the result. A rank that dies, hangs (a
peer stuck in NCCL, a device synchronise) or fails mid-generation costs the request it was serving:
the service replaces the group, and the process serving Triton never blocks in a collective.
``close`` tells the ranks to leave and makes sure they are gone. Nothing here knows about Triton.

Starting (and restarting) the group is not done until every rank has loaded its model and the whole
group has run the warm-up generations: every first-call cost (loading, allocation, kernel selection
for a shape) is paid there, never by a request. Each worker reports over a pipe of its own when it
is about to join the process group and when its model is loaded (or why it could not), so the service
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

import numpy as np
import torch
import torch.distributed as dist

from ..core.defaults import DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_SCHEDULER, DEFAULT_WIDTH
from ..core.denoise import (GenerationCancelled, GenerationRefused, GenerationRequest, GenerationResult,
                            PatchParallelDenoiser)
from ..core.devices import set_cpu_threads
from ..core.model import Conditioning
from ..core.parallel import ParallelConfig
from ..core.placement import check_transportable, for_transport
from ..core.ranks import LocalRendezvous, RankGroup, exit_now
from ..engines.loader import load_denoiser, load_parallel_decoder
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
    cuda_graphs: bool = False  # TensorRT segment engines replay as CUDA graphs
    dtype: str = "auto"
    threads: int | None = None  # CPU threads per rank (default: cores / ranks)
    python: str | None = None  # interpreter for worker processes (default: this one)
    # Served ranks load the UNet only: every request brings its conditioning (the text encoder model's).
    # True: every rank also loads the text encoders, so that a request may come without (tests).
    text_encoders: bool = False
    # Every rank also loads the VAE (float32) and decodes its latent slab when a request asks for the
    # image (core/patch_vae.py); then no process holds the full-resolution decoder activations.
    decode: bool = False
    decode_timeout_s: float = 600.0  # longest rank 0 may stay silent while the group decodes
    rank_timeout_s: float = 60.0  # longest any collective may wait for another rank (a dead or hung rank)
    start_timeout_s: float = 600.0  # longest a worker may take to start and load its model
    # Generations the whole group runs before it takes requests (on every start and restart), so that
    # no request pays a first call's costs; None: one at the default size (see ``warmup_requests``).
    warmup: tuple[GenerationRequest, ...] | None = None


@dataclass(frozen=True)
class StepReport:
    """What rank 0 tells the service after each step: ``index`` (0-based), whether the step was
    synchronous, its exchange wait so far (seconds) and, on a preview step, the first image's latents
    (float32 [1, C, h, w], denoiser scale)."""

    index: int
    synchronous: bool
    wait_seconds: float = 0.0
    preview: np.ndarray | None = None


def wants_preview(index: int, steps: int, preview_every: int) -> bool:
    """Whether step ``index`` (0-based) of ``steps`` carries a preview: every ``preview_every``-th step,
    never the last (the final image follows it)."""
    return preview_every > 0 and (index + 1) % preview_every == 0 and index + 1 < steps


def warmup_requests(sizes=((DEFAULT_HEIGHT, DEFAULT_WIDTH),), guidance: float = DEFAULT_GUIDANCE,
                    scheduler: str = DEFAULT_SCHEDULER) -> tuple[GenerationRequest, ...]:
    """One short generation per size, shaped like the requests to come (guidance decides the batch):
    two steps, run with one synchronous warm-up step, so both the synchronous and the asynchronous
    step paths (and their engines) run once."""
    return tuple(GenerationRequest("warm-up", height=h, width=w, steps=2, guidance=guidance, scheduler=scheduler)
                 for h, w in sizes)


def warmup_conditioning(model: str, request: GenerationRequest) -> Conditioning:
    """Zero text conditioning shaped like the text encoder model's for ``request`` (the ranks load no text
    encoder; a warm-up needs shapes, not meaning)."""
    from .validation import TensorShapes

    shapes = TensorShapes.read(model)
    batch = 2 if request.guided else 1
    embeds = torch.zeros(batch, shapes.tokens, shapes.embed_dim)
    if shapes.time_ids_dim == 1:  # SD 1.x/2.x: no added conditioning
        return Conditioning(embeds, None)
    time_ids = torch.tensor([[request.height, request.width, 0, 0, request.height, request.width]] * batch,
                            dtype=torch.float32)
    return Conditioning(embeds, {"text_embeds": torch.zeros(batch, shapes.text_embeds_dim), "time_ids": time_ids})


class RankGroupFailed(RuntimeError):
    """A rank died or hung during a request; the group was restarted and the request may be retried."""


def _load(config: RankServiceConfig, ranks: RankGroup) -> PatchParallelDenoiser:
    if config.device_kind == "cpu":
        set_cpu_threads(config.world_size, config.threads)
    return load_denoiser(config.model, ranks, config.parallel, config.dtype, config.engine, config.engine_dir,
                         unet_only=not config.text_encoders, cuda_graphs=config.cuda_graphs)


def _load_decoder(config: RankServiceConfig, ranks: RankGroup):
    """``decode(latents, unit_rows) -> image`` for every rank of the group (each rank its slab), or None
    when the group does not decode."""
    if not config.decode:
        return None
    return load_parallel_decoder(config.model, ranks, config.engine, config.engine_dir).decode


DECODING = ("decoding",)  # rank 0 tells the service that the group decodes now (no step reports meanwhile)
JOINING, LOADED = "joining", "loaded"  # what a worker reports to the service while it starts
LEAVE = ("leave",)  # the service tells rank 0 to end the group
GO, STOP = ("go",), ("stop",)  # the service's verdict on every step rank 0 reports: go on, or stop here


def _worker_main(rank: int, rendezvous: LocalRendezvous, config: RankServiceConfig, report, requests=None) -> None:
    """One rank of the group, in its own process. Rank 0 also takes the service's requests over
    ``requests`` (a duplex pipe) and answers each with one of ("done", result), ("cancelled", why),
    ("refused", why) or ("failed", traceback), sending ("step", StepReport) after every step."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"rank {rank}: %(message)s")
    try:
        report.send(JOINING)
        if config.world_size == 1:
            ranks = RankGroup.single("cuda" if config.device_kind == "cuda" else "cpu")
        else:
            ranks = RankGroup.join(rank, config.world_size, rendezvous, config.device_kind, config.rank_timeout_s)
        denoiser = _load(config, ranks)
        decoder = _load_decoder(config, ranks)
        log.info("model loaded on %s: %s", ranks.device, memory_in_use(ranks.device))
    except BaseException:
        report.send(traceback.format_exc())
        raise
    report.send(LOADED)
    report.close()
    try:
        if rank == 0:
            _serve_requests(ranks, denoiser, decoder, requests)
        else:
            _follow_rank0(ranks, denoiser, decoder)
        ranks.leave()  # every rank reached the end: no collective is torn down under another rank
    finally:
        ranks.close()
    exit_now()



def _serve_requests(ranks: RankGroup, denoiser: PatchParallelDenoiser, decoder, requests) -> None:
    many = ranks.world_size > 1
    while True:
        try:
            message = requests.recv()
        except (EOFError, OSError):  # the service is gone: end the group
            message = LEAVE
        if message == LEAVE:
            if many:
                _signal(ranks, more=False)
            return
        if message in (GO, STOP):  # the verdict on a generation's last step, which nobody asked for
            continue
        _, request, parallel, cond, decode, preview_every = message
        if many:
            _signal(ranks, more=True)  # tiny: never blocks on a stuck worker
            dist.broadcast_object_list([message], src=0, group=ranks.control)

        def stop_asked() -> bool:  # the service's verdict on the step just reported
            try:
                return requests.recv() == STOP
            except (EOFError, OSError):
                return True

        def report_step(i: int, synchronous: bool, latents) -> None:
            preview = None
            if wants_preview(i, request.steps, preview_every):
                preview = latents[:1].float().cpu().numpy()
            requests.send(("step", StepReport(i, synchronous, denoiser.context.exchange.wait_seconds, preview)))

        try:
            result = denoiser.generate(request, parallel, cond=cond, stoppable=True, should_stop=stop_asked,
                                       on_step=report_step)
            image = None
            if decode:
                requests.send(DECODING)
                image = decoder(result.latents, denoiser.factor).float().cpu()
        except GenerationCancelled as stopped:
            requests.send(("cancelled", str(stopped)))
            continue
        except GenerationRefused as refused:
            requests.send(("refused", str(refused)))
            continue
        except Exception:
            requests.send(("failed", traceback.format_exc()))
            raise  # a failure mid-generation may leave peers inside a collective: the group is replaced
        requests.send(("done", GenerationResult(latents=result.latents.float().cpu(), unet_seconds=result.unet_seconds,
                                                wait_seconds=result.wait_seconds, image=image)))


def _follow_rank0(ranks: RankGroup, denoiser: PatchParallelDenoiser, decoder) -> None:
    while _next_request_signalled(ranks):
        message = [None]
        dist.broadcast_object_list(message, src=0, group=ranks.control)
        _, request, parallel, cond, decode, _ = message[0]
        try:
            result = denoiser.generate(request, parallel, cond=cond, stoppable=True)
            if decode:
                decoder(result.latents, denoiser.factor)  # rank 0 answers with the gathered image
        except GenerationCancelled:
            log.info("generation stopped by rank 0 at a step boundary")  # every rank left at the same one
        except GenerationRefused as refused:
            log.warning("request refused before its first step: %s", refused)  # so did every rank


def memory_in_use(device: torch.device) -> str:
    """This process's memory after loading, for the log (docs/gpu.md lists it per rank)."""
    if device.type == "cuda":
        return f"{torch.cuda.memory_allocated(device) / 2**20:.0f} MiB allocated on the GPU"
    try:
        with open("/proc/self/status") as f:
            rss = next(line.split()[1] for line in f if line.startswith("VmRSS:"))
        return f"{int(rss) / 1024:.0f} MiB resident"
    except (OSError, StopIteration):
        return "memory unknown"


def _next_request_signalled(ranks: RankGroup) -> bool:
    """Workers: wait (unbounded) for rank 0's word: 1 = a request follows, 0 = leave."""
    word = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(word, src=0, group=ranks.idle)
    return bool(word.item())


def _signal(ranks: RankGroup, more: bool) -> None:
    dist.broadcast(torch.tensor([1 if more else 0], dtype=torch.int64), src=0, group=ranks.idle)


class RankService:
    """The group's supervisor, in the calling process (the Triton model instance): it holds no rank.
    Every rank, rank 0 included, is a worker process, so that a rank blocked in a device synchronise or
    torn down by NCCL's watchdog costs the request it was serving, never the process serving Triton."""

    def __init__(self, config: RankServiceConfig, on_state=None):
        """``on_state(state, reason, worker_pids)``: told when the group is starting, ready, restarting or
        failed (``signals.STARTING`` ...), e.g. to publish it for the server's readiness."""
        self.config = config
        self.on_state = on_state or (lambda state, reason, workers: None)
        self.workers: list[multiprocessing.Process] = []
        self._rank0 = None  # the service's end of rank 0's request pipe
        self._rendezvous = None
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
        """Starts every rank's process and waits until each has joined the group and loaded its model;
        then the group runs the warm-up generations. Undone if any of it fails."""
        started, reports = time.perf_counter(), []
        try:
            reports = self._start_workers()
            self._await_workers(reports, JOINING)  # process start and imports: not bounded by rank_timeout_s
            self._await_workers(reports, LOADED)
            loaded = time.perf_counter()
            self._warm_up()
        except BaseException:
            self._stop_workers(kill=True)
            raise
        finally:
            for report in reports:
                report.close()
        self._group_ok = True
        self.last_start_s = time.perf_counter() - started
        log.info("rank group of %d ready to serve: started in %.1f s (warm-up %.1f s)", self.config.world_size,
                 self.last_start_s, time.perf_counter() - loaded)

    def _start_workers(self) -> list:
        config = self.config
        context = multiprocessing.get_context("spawn")
        if config.python:
            context.set_executable(config.python)
        self._rendezvous = rendezvous = LocalRendezvous.create()  # removed with the group (_stop_workers)
        log.info("starting %d rank process(es)", config.world_size)
        self.workers, reports = [], []
        for rank in range(config.world_size):
            receive, send = context.Pipe(duplex=False)
            requests = None
            if rank == 0:
                self._rank0, requests = context.Pipe(duplex=True)
            worker = context.Process(target=_worker_main, args=(rank, rendezvous, config, send, requests),
                                     daemon=True, name=f"distrifusion-rank-{rank}")
            worker.start()
            send.close()  # the worker holds the only send end: its exit reads as end of file
            if requests is not None:
                requests.close()
            self.workers.append(worker)
            reports.append(receive)
        return reports

    def _await_workers(self, reports: list, wanted: str) -> None:
        """Waits (up to ``start_timeout_s``) for every worker to report ``wanted``; raises with the reason
        as soon as one reports a failure or exits."""
        deadline = time.monotonic() + self.config.start_timeout_s
        waiting = dict(enumerate(zip(reports, self.workers)))
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
        for request in requests:  # decoding too, where the group decodes: its first call is paid here as well
            self._run(request, parallel, warmup_conditioning(self.config.model, request), decode=self.config.decode)

    def _run(self, request: GenerationRequest, parallel: ParallelConfig, cond: Conditioning | None = None,
             on_step=None, should_stop=None, decode: bool = False, preview_every: int = 0) -> GenerationResult:
        """Hands the request to rank 0 and follows it: after every step rank 0 reports, ``on_step`` runs with
        its ``StepReport`` and rank 0 is told to go on or stop (``should_stop``), as rank 0 itself decided when it lived here;
        then the answer (with the image when ``decode``). Raises ``_GroupBroken`` when a rank dies or rank 0
        falls silent."""
        if decode and not self.config.decode:
            raise ValueError("this rank group does not decode (RankServiceConfig.decode is false)")
        message = ("generate", request, parallel, for_transport(cond), decode, preview_every)  # host tensors: each rank places them
        check_transportable(message)
        try:
            self._rank0.send(message)
        except OSError:
            raise _GroupBroken(f"rank worker(s) {self._died()} died") from None
        # rank 0 reports every step; silence longer than a collective may wait means a rank hangs
        silence_limit = self.config.rank_timeout_s + SILENCE_MARGIN_S
        heard = time.monotonic()
        sentinels = [w.sentinel for w in self.workers]
        while True:
            ready = multiprocessing.connection.wait([self._rank0, *sentinels], timeout=POLL_S)
            if self._rank0 in ready:
                try:
                    answer = self._rank0.recv()
                except (EOFError, OSError):  # end of file, or a reset when rank 0 died with bytes unread
                    raise _GroupBroken(f"rank worker(s) {self._died()} died") from None
                heard = time.monotonic()
                kind = answer[0]
                if answer == DECODING:  # one decode, no step reports: bounded by its own limit
                    silence_limit = max(silence_limit, self.config.decode_timeout_s)
                    continue
                if kind == "step":
                    if on_step is not None:
                        on_step(answer[1])
                    try:
                        self._rank0.send(STOP if should_stop is not None and should_stop() else GO)
                    except OSError:
                        raise _GroupBroken(f"rank worker(s) {self._died()} died") from None
                    continue
                if kind == "done":
                    return answer[1]
                if kind == "cancelled":
                    raise GenerationCancelled(answer[1])
                if kind == "refused":
                    raise GenerationRefused(answer[1])
                raise _GroupBroken(f"rank 0 failed:\n{answer[1]}")
            dead = self._dead_workers()
            if dead:
                raise _GroupBroken(f"rank worker(s) {dead} died")
            if time.monotonic() - heard > silence_limit:
                raise _GroupBroken(f"rank 0 sent nothing for {silence_limit:.0f} s (a rank hangs)")

    def generate(self, request: GenerationRequest, cond: Conditioning | None = None,
                 parallel: ParallelConfig | None = None, on_step=None, should_stop=None,
                 decode: bool = False, preview_every: int = 0) -> GenerationResult:
        """Runs one request on every rank (``decode``: the group also decodes, the result carries the
        image; ``on_step(StepReport)`` after every step, with the latents every ``preview_every`` steps). A
        rank that died (before or during it) or hangs longer than ``rank_timeout_s`` fails this
        request with ``RankGroupFailed`` after the group is restarted; a request the ranks refuse before
        the first step raises ``GenerationRefused`` (no restart)."""
        parallel = parallel or self.config.parallel
        self.ensure_ready()
        try:
            return self._run(request, parallel, cond, on_step, should_stop, decode, preview_every)
        except _GroupBroken as broken:
            reason = str(broken)
            self._restart(reason)
            raise RankGroupFailed(f"the request failed because {reason}; the rank group was restarted, "
                                  "retry the request") from None

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

    def _died(self, wait_s: float = 1.0) -> list[int]:
        """The ranks that exited, once rank 0's pipe broke (its process may take a moment to be reaped)."""
        deadline = time.monotonic() + wait_s
        while not self._dead_workers() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._dead_workers() or [0]

    def _dead_workers(self) -> list[int]:
        return [rank for rank, w in enumerate(self.workers) if not w.is_alive()]

    def _restart(self, reason: str) -> None:
        """Replaces the group; returns once the new one is loaded and warm (before the failed request
        returns, so the next request finds a group as fast as ever)."""
        log.error("restarting the rank group: %s", reason)
        self.on_state(RESTARTING, reason, [])
        self._group_ok = False
        self._stop_workers(kill=True)
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
        if self._rendezvous is not None:
            self._rendezvous.remove()
            self._rendezvous = None
        if self._rank0 is not None:
            self._rank0.close()
            self._rank0 = None

    @property
    def worker_pids(self) -> list[int]:
        """Every rank's process, rank 0 first."""
        return [w.pid for w in self.workers]

    def close(self, timeout: float = 10.0) -> None:
        """Tells every rank to leave and makes sure each is gone within ``timeout`` seconds."""
        healthy = self.workers and not self._dead_workers()
        if healthy:
            try:
                self._rank0.send(LEAVE)
            except OSError as error:  # a dead rank 0 must not keep the others alive
                log.warning("could not tell the rank group to stop: %s", error)
        self._stop_workers(kill=not healthy, timeout=timeout)


class _GroupBroken(Exception):
    """A rank died, hung or failed mid-generation: the group must be replaced."""


POLL_S = 0.05  # how often a running request checks should_stop and the workers' health
SILENCE_MARGIN_S = 30.0  # beyond rank_timeout_s: rank 0 reports every step, and every collective is bounded
