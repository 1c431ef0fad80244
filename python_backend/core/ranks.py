"""The rank group: processes that generate one image together, and how they are started.

Ranks talk through torch.distributed: NCCL between GPUs, gloo on CPU, the same code. With
classifier-free guidance split, ranks [0, N/2) form the unconditional patch group and [N/2, N)
the conditional one; otherwise all ranks form one patch group running the whole guided batch.

Every rank of a group runs on this host, so nothing of the group listens beyond it: the ranks meet
through a torch.distributed FileStore in a private folder (:class:`LocalRendezvous`, mode 0700), not
a TCPStore (whose server listens on every interface whatever address it is given), and gloo and
NCCL open their sockets on the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` =
``lo`` unless the environment names another one).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import pickle
import shutil
import socket
import sys
import tempfile
from datetime import timedelta
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .devices import set_cpu_threads, threads_per_rank
from .parallel import group_shape

log = logging.getLogger("distrifusion.ranks")


@dataclass
class PatchPlan:
    """How one generation maps onto the rank group."""

    group: object | None  # process group of this rank's patch group (None: single rank)
    size: int  # ranks in the patch group
    index: int  # this rank's slab index inside it
    branch: int | None  # 0 unconditional, 1 conditional, None: the whole guided batch


LOOPBACK_SOCKET_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
"""Variables naming the interface gloo and NCCL open their sockets on; ``lo`` for local groups
unless already set."""
LOOPBACK_INTERFACE = "lo"


def use_loopback_sockets() -> None:
    """Makes gloo and NCCL (in this process and those it starts) listen and connect on loopback only,
    unless the user chose an interface."""
    for name in LOOPBACK_SOCKET_ENV:
        os.environ.setdefault(name, LOOPBACK_INTERFACE)


NCCL_FAULT_HANDLING = {
    # A collective still waiting at the group's timeout (a peer died or hangs) ends this rank's process,
    # without aborting the communicator first: an abort can itself hang behind a peer wedged in a kernel.
    # Every rank is a worker the service supervises, so the death is seen at once and the group replaced;
    # the service also kills a group whose rank 0 falls silent (rank timeout + a margin), whatever NCCL does.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
}
"""The NCCL error handling every rank runs with (docs/gpu.md); a value the environment sets wins."""


def use_nccl_fault_handling(environ=os.environ) -> dict[str, str]:
    """Sets :data:`NCCL_FAULT_HANDLING` where the environment does not choose; returns what is in force."""
    for name, value in NCCL_FAULT_HANDLING.items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in NCCL_FAULT_HANDLING}


@dataclass(frozen=True)
class LocalRendezvous:
    """Where the ranks of one group on this host meet: a FileStore in a private folder (mode 0700).

    The process that creates it (``create``) removes it (``remove``); every rank gets a copy (it
    pickles) and passes it to :meth:`RankGroup.join`. Use a new one for every group: a store file is
    good for one process group only.
    """

    folder: str
    owner: int  # pid of the creating process: the only one whose ``remove`` deletes the folder

    @classmethod
    def create(cls) -> "LocalRendezvous":
        folder = tempfile.mkdtemp(prefix="distrifusion-ranks-")  # mode 0700
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # also when a start fails before joining
        return cls(folder, os.getpid())

    @property
    def init_method(self) -> str:
        return f"file://{os.path.join(self.folder, 'store')}"

    def remove(self) -> None:
        if os.getpid() == self.owner:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class RankGroup:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    halves: tuple | None = None  # the two CFG patch groups, when world_size is even and >= 2
    idle: object | None = None  # gloo, unbounded wait: workers wait here for the next request
    control: object | None = None  # gloo, bounded like the data groups: requests and step decisions
    rendezvous: LocalRendezvous | None = None  # removed on close by the process that created it

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "RankGroup":
        return cls(device=torch.device(device))

    @classmethod
    def join(cls, rank: int, world_size: int, rendezvous: LocalRendezvous, device_kind: str = "cpu",
             timeout_s: float | None = None) -> "RankGroup":
        """Joins (collectively) the process group; every rank calls this with the same arguments.

        The ranks meet at ``rendezvous`` (a private FileStore: no listening socket) and talk over
        loopback (:func:`use_loopback_sockets`). ``timeout_s`` bounds every collective of the data
        groups: a rank that died or hangs makes the others fail after at most that long instead of
        waiting forever.
        """
        timeout = timedelta(seconds=timeout_s) if timeout_s else timedelta(minutes=30)
        if device_kind == "cuda":
            handling = use_nccl_fault_handling()  # before the process group reads it
            torch.cuda.set_device(rank % torch.cuda.device_count())
            device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
            if rank == 0:
                log.info("NCCL collectives time out after %.0f s; then %s", timeout.total_seconds(),
                         ", ".join(f"{k}={v}" for k, v in handling.items()))
        else:
            device, backend = torch.device("cpu"), "gloo"
        use_loopback_sockets()
        try:
            dist.init_process_group(backend, init_method=rendezvous.init_method, rank=rank, world_size=world_size,
                                    timeout=timeout)
        except BaseException:
            rendezvous.remove()
            raise
        halves = None
        if world_size >= 2 and world_size % 2 == 0:
            half = world_size // 2
            halves = (dist.new_group(list(range(half)), timeout=timeout),
                      dist.new_group(list(range(half, world_size)), timeout=timeout))
        # Idle workers wait on `idle` between requests, possibly for days; everything said during a
        # request goes over `control`, whose timeout catches a rank that died or hangs.
        idle = dist.new_group(backend="gloo", timeout=timedelta(days=365))
        control = dist.new_group(backend="gloo", timeout=timeout)
        if rank == 0:
            log.info("rank group of %d ready (%s)", world_size, backend)
        return cls(rank=rank, world_size=world_size, device=device, halves=halves, idle=idle, control=control,
                   rendezvous=rendezvous)

    def plan(self, guided: bool, split_cfg: bool) -> PatchPlan:
        if self.world_size == 1:
            return PatchPlan(group=None, size=1, index=0, branch=None)
        shape = group_shape(self.world_size, guided, split_cfg)
        if shape.split:
            branch = self.rank // shape.patches
            return PatchPlan(group=self.halves[branch], size=shape.patches, index=self.rank % shape.patches,
                             branch=branch)
        return PatchPlan(group=dist.group.WORLD, size=self.world_size, index=self.rank, branch=None)

    def leave(self) -> None:
        """The orderly end of a group: every rank waits here for the others before any tears its process
        group down, so that no rank destroys a connection another still reads (gloo aborts a process,
        "terminate called without an active exception", when a peer vanishes under a pending operation)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier(group=self.control)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.rendezvous is not None:
            self.rendezvous.remove()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, rendezvous, device_kind, threads, job, args, results):
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if device_kind == "cpu":
        set_cpu_threads(world_size, threads)
    group = RankGroup.join(rank, world_size, rendezvous, device_kind)
    try:
        result = job(group, *args)
        if rank == 0:
            # Plain pickle copies tensors inline; the queue's own pickler would pass shared memory
            # that disappears with this process.
            results.put(pickle.dumps(result))
        group.leave()
    finally:
        group.close()
    exit_now()


def exit_now() -> None:
    """Ends a rank's process without interpreter finalisation: torch's, gloo's and the tokenizers' native
    threads are torn down by destructors at exit, which hung the process for seconds (and, in the rank
    jobs, once aborted it: "terminate called without an active exception"). Only multiprocessing's own
    finalisers run: they unlink the named semaphores this process made (tqdm's lock is one), which would
    otherwise be left to the resource tracker ("leaked semaphore objects" at the parent's exit)."""
    multiprocessing.util._run_finalizers(0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_ranks(world_size: int, job, args: tuple = (), device_kind: str = "cpu", threads: int | None = None):
    """Runs ``job(rank_group, *args)`` on ``world_size`` ranks and returns rank 0's result.

    One rank runs in this process; more ranks are started as local processes, one per device.
    """
    if world_size == 1:
        if device_kind == "cpu":
            set_cpu_threads(world_size, threads)
        device = "cuda" if device_kind == "cuda" else "cpu"
        return job(RankGroup.single(device), *args)
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    rendezvous = LocalRendezvous.create()
    log.info("starting %d rank processes (%s, %d thread(s) each)", world_size, device_kind,
             threads_per_rank(world_size, threads))
    try:
        processes = mp.start_processes(
            _rank_main,
            args=(world_size, rendezvous, device_kind, threads, job, args, results),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        # Read while waiting: a large result would otherwise fill the pipe and block rank 0's exit.
        received = []
        while not processes.join(timeout=0.2):
            if not received and not results.empty():
                received.append(pickle.loads(results.get()))
        if not received and not results.empty():
            received.append(pickle.loads(results.get()))
    finally:
        rendezvous.remove()
    if not received:
        raise RuntimeError("rank 0 finished without a result")
    return received[0]
