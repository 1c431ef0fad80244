"""How patch buffers travel between the ranks of a patch group.

``BufferExchange`` all-gathers one tensor per rank under a key, blocking or asynchronously, and keeps
the latest gathered list per key. Tensors of unequal shapes (unequal slabs) are flattened and padded
to the largest, so one fixed-size collective serves gloo and NCCL alike. It knows nothing of layers
or modes; it only records, for inspection, when each collective was started and waited for.

Storage is registered once and reused: a bundle that recurs (the same keys and shapes every step) gets
one send buffer and two receive buffers, used in alternate steps, so a step reads the previous step's
buffers while the next ones arrive and a steady-state step allocates nothing; each retained blocking
key gets one buffer pair of its own. Storage that a generation did not use is released at the next
``reset`` (another size or batch), so a deployment that varies its requests does not accumulate it.

Keys routed to the neighbours (``route_to_neighbours``: conv halo rows, which only the slabs just above
and below read) travel point to point to those two ranks instead of to every rank; the other ranks'
slots of their gathered lists hold zeros.

With a ``codec`` (``--exchange-dtype``, core/exchange_codec.py) the asynchronous exchanges travel as
the codec's uint8 wire (all keys in one bundle) and every gathered buffer is decoded once, when it is
first read; blocking (synchronous) gathers stay exact and tell the codec what every rank now holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .exchange_codec import ExchangeCodec
from .wait_clock import WaitClock

SLOT_ALIGNMENT_BYTES = 256
"""Where each key starts inside a bundle: TensorRT requires 256-byte aligned tensor addresses, and the
stale inputs of an engine are views into the gathered bundles."""


def aligned_length(numel: int, element_size: int) -> int:
    """``numel`` rounded up so that the next slot of a bundle starts on a SLOT_ALIGNMENT_BYTES boundary."""
    step = max(1, SLOT_ALIGNMENT_BYTES // element_size)
    return -(-numel // step) * step


@dataclass
class ExchangeEvent:
    key: str
    kind: str  # "blocking", "started", "waited"
    step: int  # the step in which this happened
    started_step: int  # the step in which the collective was started
    nbytes: int  # bytes this rank published


@dataclass
class _Gather:
    started_step: int
    shapes: list[tuple[int, ...]]
    buffers: list[torch.Tensor]
    work: object | None  # the async handle, None once complete
    result: list[torch.Tensor] | None = None
    carrier: "_Gather | None" = None  # the collective this key travels in
    views: list[torch.Tensor] | None = None  # this key's per-rank views into the carrier's storage
    decode: object | None = None  # views -> tensors, for a key that travelled as a codec's wire


@dataclass
class _Storage:
    """The persistent buffers of one recurring collective: ``slots`` gives each key's offset and per-rank
    shapes; ``send`` holds this rank's padded contribution; ``receive`` holds one flat [size x length] buffer per
    turn (two for bundles, whose turns alternate step by step; one for blocking keys, read before reuse)."""

    slots: dict[str, tuple[int, int, list[tuple[int, ...]]]]  # key -> (offset, length, per-rank shapes)
    send: torch.Tensor
    receive: list[torch.Tensor]
    wire: bool  # the slots hold a codec's wire bytes, not the buffers themselves
    turn: int = 0
    used: bool = True
    last: "_Gather | None" = None  # the latest collective that wrote from ``send``

    @classmethod
    def allocate(cls, layout: list[tuple[str, int, list[tuple[int, ...]]]], size: int, dtype, device, turns: int,
                 wire: bool) -> "_Storage":
        """``layout``: (key, elements of its largest per-rank slot, per-rank shapes) in bundle order."""
        slots, offset = {}, 0
        for key, longest, shapes in layout:
            length = aligned_length(longest, dtype.itemsize)
            slots[key] = (offset, length, shapes)
            offset += length
        send = torch.zeros(offset, dtype=dtype, device=device)  # the padding stays zero
        # flat (gloo wants it); zeros, because a neighbours-only exchange never writes the other ranks' slots
        receive = [torch.zeros(size * offset, dtype=dtype, device=device) for _ in range(turns)]
        return cls(slots, send, receive, wire)

    def slot(self, key: str) -> torch.Tensor:
        """This rank's whole slot for ``key`` in the send buffer (flat)."""
        offset, length, _ = self.slots[key]
        return self.send[offset : offset + length]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self.slot(key)[: tensor.numel()].view(tensor.shape).copy_(tensor)

    def take_turn(self) -> torch.Tensor:
        """The receive buffer of this turn (the other one may still be read)."""
        buffer = self.receive[self.turn]
        self.turn = (self.turn + 1) % len(self.receive)
        self.used = True
        return buffer

    def views(self, buffer: torch.Tensor, key: str) -> list[torch.Tensor]:
        """Each rank's ``key`` in a received buffer: shaped, or its whole (flat) wire slot."""
        offset, length, shapes = self.slots[key]
        stride = self.send.numel()
        if self.wire:
            return [buffer[r * stride + offset : r * stride + offset + length] for r in range(len(shapes))]
        return [buffer[r * stride + offset : r * stride + offset + math.prod(shape)].view(shape)
                for r, shape in enumerate(shapes)]


@dataclass
class BufferExchange:
    group: object | None  # a torch.distributed process group; None with a single rank
    index: int  # this rank's position in ``group``
    size: int  # ranks in ``group``
    step: int = 0
    record: bool = True
    # False: a blocking gather's result goes to its caller only (a one-shot pass such as the VAE decoder,
    # where nothing is read stale and every layer's gathered rows would otherwise live to the end)
    retain: bool = True
    events: list[ExchangeEvent] = field(default_factory=list)
    _latest: dict[str, _Gather] = field(default_factory=dict)
    _queued: list = field(default_factory=list)  # (key, tensor, shapes) waiting for flush()
    clock: WaitClock = field(default_factory=WaitClock)  # time held up by collectives (blocking gathers, waits)
    _storage: dict[tuple, _Storage] = field(default_factory=dict)  # by (keys and shapes, dtype, device)
    codec: ExchangeCodec | None = None  # None: asynchronous exchanges travel as they are (native)
    _to_neighbours: set[str] = field(default_factory=set)  # keys only the neighbouring ranks read

    def route_to_neighbours(self, key: str) -> None:
        """From now on ``key`` goes only to the ranks just above and below this one (conv halo rows:
        no other rank reads them); every rank of the group routes the same keys. With two ranks the
        neighbour is every other rank, so the key stays in the all-gather (one collective fewer)."""
        if self.size > 2:
            self._to_neighbours.add(key)

    @property
    def held_keys(self) -> list[str]:
        """The keys whose latest gathered buffers this exchange keeps."""
        return list(self._latest)

    @property
    def wait_seconds(self) -> float:
        """Time this rank was held up by collectives: on the host (gloo), on the device's stream (NCCL)."""
        return self.clock.seconds

    def gather(self, key: str, tensor: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Blocking all-gather; the result becomes the latest for ``key``."""
        self._retire(key)
        started = self.clock.begin(tensor.device)
        if self.retain and self.size > 1:
            pending = self._launch_into_storage([(key, tensor, [tuple(s) for s in shapes])], async_op=False,
                                                to_neighbours=key in self._to_neighbours)[key]
        else:
            pending = self._launch(tensor, shapes, async_op=False)
        self.clock.end(started)
        self._log(key, "blocking", self.step, tensor)
        if self.retain:
            self._latest[key] = pending
        result = self._complete(pending)
        if self.codec is not None and self.retain:
            self.codec.observe_exact(key, result)
        return result

    def start(self, key: str, tensor: torch.Tensor, shapes: list[tuple[int, ...]]) -> None:
        """Queues ``key`` for the next async all-gather; ``latest(key)`` waits for it when next needed.

        ``flush`` sends everything queued as one collective (per dtype), so a block or segment pays the
        per-collective latency once instead of once per layer.
        """
        self._queued.append((key, tensor, [tuple(s) for s in shapes]))

    def flush(self) -> None:
        """Launches the async all-gather of everything queued since the last flush."""
        if self._queued:
            items, self._queued = self._queued, []
            self._start_bundle(items)

    def _start_bundle(self, items: list[tuple[str, torch.Tensor, list[tuple[int, ...]]]]) -> None:
        # Each key is padded to its largest per-rank size (rounded up to the slot alignment), so every
        # rank's bundle has the same length and every key starts aligned; latest(key) unpacks a key from
        # it exactly as if it had travelled alone. One bundle per dtype (a codec's wire: one in all).
        groups: dict[tuple, list] = {}
        for key, tensor, shapes in items:
            self._retire(key)
            carried_as = torch.uint8 if self.codec is not None and self.size > 1 else tensor.dtype
            route = key in self._to_neighbours
            groups.setdefault((carried_as, route), []).append((key, tensor, [tuple(s) for s in shapes]))
        for (_, route), group in groups.items():
            if self.size == 1:
                for key, tensor, shapes in group:
                    self._latest[key] = _Gather(self.step, shapes, [tensor.contiguous()], None)
                    self._log(key, "started", self.step, tensor)
            else:
                self._latest.update(self._launch_into_storage(group, async_op=True, to_neighbours=route))

    def _launch_into_storage(self, group, async_op: bool, to_neighbours: bool = False) -> dict[str, _Gather]:
        """One collective for ``group`` through the storage registered for exactly these keys and shapes
        (a codec's wire for asynchronous ones, if there is a codec): an all-gather, or with
        ``to_neighbours`` a point-to-point exchange with the ranks above and below; returns each key's
        pending gather."""
        first = group[0][1]
        codec = self.codec if async_op else None
        signature = (tuple((key, t.dtype, tuple(shapes)) for key, t, shapes in group), first.device, async_op,
                     to_neighbours)
        storage = self._storage.get(signature)
        if storage is None:
            if codec is None:
                layout = [(key, max(math.prod(s) for s in shapes), shapes) for key, _, shapes in group]
            else:
                layout = [(key, max(codec.wire_nbytes(s, t.dtype) for s in shapes), shapes) for key, t, shapes in group]
            storage = _Storage.allocate(layout, self.size, torch.uint8 if codec else first.dtype, first.device,
                                        turns=2 if async_op else 1, wire=codec is not None)
            self._storage[signature] = storage
        if storage.last is not None:  # the send buffer is rewritten only once its last collective is done
            self._complete(storage.last)
        published = {}
        for key, tensor, shapes in group:
            if tuple(tensor.shape) != shapes[self.index]:
                raise ValueError(f"{key}: published shape {tuple(tensor.shape)} != expected {shapes[self.index]}")
            if codec is None:
                storage.write(key, tensor)
                published[key] = tensor.numel() * tensor.element_size()
            else:
                published[key] = codec.encode(key, tensor, out=storage.slot(key)).numel()
        receive = storage.take_turn()
        if to_neighbours:
            work = self._swap_with_neighbours(receive, storage.send, async_op)
        else:
            work = self._collect(receive, storage.send, async_op)
        carrier = _Gather(self.step, [], [storage.send], work)
        storage.last = carrier
        pending = {}
        for key, tensor, shapes in group:
            decode = None if codec is None else _Decoder(codec, key, tensor.dtype)
            pending[key] = _Gather(self.step, shapes, [], None, carrier=carrier, views=storage.views(receive, key),
                                   decode=decode)
            if async_op:
                self._log(key, "started", self.step, None, nbytes=published[key])
        return pending

    def latest(self, key: str) -> list[torch.Tensor] | None:
        """The most recent gathered list for ``key`` (waiting for it if still in flight), or None."""
        if any(queued == key for queued, _, _ in self._queued):
            self.flush()
        pending = self._latest.get(key)
        if pending is None:
            return None
        if pending.result is None:
            self._log(key, "waited", pending.started_step, None)
        return self._complete(pending)

    def drain(self) -> None:
        """Sends what is queued and waits for every collective still in flight (end of a generation)."""
        self.flush()
        for pending in self._latest.values():
            self._complete(pending)

    def reset(self) -> None:
        """Forgets every buffer, so nothing carries over into the next generation; releases the storage
        that the generation since the last reset did not use."""
        self.drain()
        for signature, storage in list(self._storage.items()):
            if not storage.used:
                del self._storage[signature]
            storage.used, storage.last = False, None
        self._latest.clear()
        self._queued.clear()
        if self.codec is not None:
            self.codec.reset()
        self.events.clear()
        self.clock.reset()
        self.step = 0

    # --- internals ---

    def _launch(self, tensor: torch.Tensor, shapes: list[tuple[int, ...]], async_op: bool) -> _Gather:
        shapes = [tuple(s) for s in shapes]
        if tuple(tensor.shape) != shapes[self.index]:
            raise ValueError(f"published shape {tuple(tensor.shape)} != expected {shapes[self.index]}")
        if self.size == 1:
            return _Gather(self.step, shapes, [tensor.contiguous()], None)
        longest = max(math.prod(s) for s in shapes)
        flat = tensor.reshape(-1)
        if flat.numel() < longest:
            flat = torch.cat([flat, flat.new_zeros(longest - flat.numel())])
        flat = flat.contiguous()
        buffers = [torch.empty_like(flat) for _ in range(self.size)]
        work = dist.all_gather(buffers, flat, group=self.group, async_op=async_op)
        return _Gather(self.step, shapes, buffers, work if async_op else None)

    def _collect(self, output: torch.Tensor, send: torch.Tensor, async_op: bool):
        """All-gathers every rank's ``send`` into the flat ``output`` (rank-major); the async handle or None."""
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        work = gather(output, send, group=self.group, async_op=async_op)
        return work if async_op else None

    def _swap_with_neighbours(self, output: torch.Tensor, send: torch.Tensor, async_op: bool):
        """Sends ``send`` to the ranks just above and below and receives theirs into their slots of the
        flat ``output`` (this rank's own slot gets ``send``); the async handle or None."""
        stride = send.numel()
        output[self.index * stride : (self.index + 1) * stride].copy_(send)
        operations = []
        for peer in (self.index - 1, self.index + 1):
            if 0 <= peer < self.size:
                other = dist.get_global_rank(self.group, peer) if self.group is not None else peer
                operations.append(dist.P2POp(dist.isend, send, other, group=self.group))
                operations.append(dist.P2POp(dist.irecv, output[peer * stride : (peer + 1) * stride], other,
                                             group=self.group))
        work = _AllOf(dist.batch_isend_irecv(operations))
        if async_op:
            return work
        work.wait()
        return None

    def _complete(self, pending: _Gather) -> list[torch.Tensor]:
        if pending.result is None and pending.carrier is not None:
            self._complete(pending.carrier)
            pending.result = pending.views if pending.decode is None else pending.decode(pending.views, pending.shapes)
        if pending.result is None:
            if pending.work is not None:
                started = self.clock.begin(pending.buffers[0].device)
                pending.work.wait()
                self.clock.end(started)
                pending.work = None
            pending.result = [
                buf[: math.prod(shape)].view(shape) for buf, shape in zip(pending.buffers, pending.shapes)
            ]
        return pending.result

    def _retire(self, key: str) -> None:
        # Collectives must complete in launch order on every rank; never leave one dangling.
        old = self._latest.get(key)
        if old is not None and (old.work is not None or (old.carrier is not None and old.carrier.work is not None)):
            self._complete(old)

    def _log(self, key: str, kind: str, started_step: int, tensor: torch.Tensor | None, nbytes: int | None = None) -> None:
        if self.record:
            if nbytes is None:
                nbytes = 0 if tensor is None else tensor.numel() * tensor.element_size()
            self.events.append(ExchangeEvent(key, kind, self.step, started_step, nbytes))


@dataclass
class _AllOf:
    """One handle for several point-to-point operations."""

    works: list

    def wait(self) -> None:
        for work in self.works:
            work.wait()


@dataclass
class _Decoder:
    """Turns one key's received wire slots into every rank's buffer (once per gather: residual codecs
    keep state)."""

    codec: ExchangeCodec
    key: str
    dtype: torch.dtype

    def __call__(self, slots: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        return [self.codec.decode(self.key, rank, slot, shape, self.dtype)
                for rank, (slot, shape) in enumerate(zip(slots, shapes))]


@dataclass
class LoneRankExchange:
    """The exchange of one rank of ``size`` running alone (a synchronous one-shot pass such as the VAE
    decoder, where a whole group does not fit on the machine, or a single-device check of one rank's
    engines): every slab's data is this rank's own, cut or repeated to that slab's shape. Shapes, and so
    memory and computation, are a real group's; values, and so the result, are not."""

    index: int
    size: int
    step: int = 0

    def gather(self, key: str, tensor: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        return [tensor if tuple(shape) == tuple(tensor.shape) else _resized(tensor, shape) for shape in shapes]

    def reset(self) -> None:
        """Nothing is held."""

    def drain(self) -> None:
        """Nothing is in flight."""


def _resized(tensor: torch.Tensor, shape) -> torch.Tensor:
    for dim, length in enumerate(shape):
        if tensor.shape[dim] < length:
            repeats = [1] * tensor.ndim
            repeats[dim] = -(-length // tensor.shape[dim])
            tensor = tensor.repeat(*repeats)
        tensor = tensor.narrow(dim, 0, length)
    return tensor.contiguous()
