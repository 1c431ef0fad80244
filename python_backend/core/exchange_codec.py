"""Compressed encodings of the buffers ranks exchange every denoising step (``--exchange-dtype``).

What the ranks exchange (self-attention K/V of their slab, conv halo rows, GroupNorm moments) is read
one step stale, so it is already an approximation and can travel compressed. This module is pure
tensor math: it turns a buffer into one flat ``torch.uint8`` wire tensor and back; it never talks to
``torch.distributed``. ``BufferExchange`` packs the wire tensors of several keys into one fixed-size
uint8 all-gather.

Formats (``CodecSpec``; command-line text ``<dtype>[+residual]``)
    native      the buffer's own bytes (lossless).
    float16     values cast to float16 (clamped to +-65504 so nothing overflows to inf).
    bfloat16    values cast to bfloat16.
    int8        symmetric per-channel quantisation: scale = max|x| / 127 per channel, q in [-127, 127].
    int4        4 bits with two-level scales, for token buffers (attention K/V): each channel's max|x|
                normalises it (y = x / c), then each token's max|y| / 7 is its scale (q in [-7, 7]), so
                one token's large change does not coarsen every other token's. Only with
                ``+residual``: seven levels a side on raw activations cost ~16% relative L2 error, far
                more than a step of staleness; on the small step-to-step change they are ample, and the
                error feedback below re-sends what they miss. Halo rows (4-D payloads) travel as int8
                under this spec: they are the neighbours' exact pixels at the seams, where int4's error
                showed directly (docs/compressed_exchange.md: it cost more than half int4's loss).

Wire layout (``CodecSpec.wire_nbytes``): its length depends only on the buffer's shape, the source
dtype and the spec, never on the values, so every step's all-gather has the same size.
    native, float16, bfloat16:  numel x itemsize bytes, the values as they lie in memory.
    int8:  [numel bytes: q as int8] [zero pad to a multiple of 4] [C x float32 scales]
    int4:  [ceil(numel / 2) bytes: byte i holds value 2i in its low nibble and 2i+1 in its high one,
           each stored as q + 8 in 1..15; an odd tail is padded with 8 (zero)]
           [zero pad to a multiple of 4] [C x float32 channel scales] [B x T float32 token scales]
           (the decoded value is q x token scale x channel scale)
Values are in C (row-major) order of the buffer. C is the channel count of ``channel_axis``: dim 1
of a 4-D NCHW halo payload [B, C, rows, W], the last dim of a 3-D token buffer [B, T, C] (attention
K/V), one channel for anything else. A channel whose values are all zero gets scale 0 and decodes to
zeros. Scales are float32: 4 bytes a channel are nothing beside the values, and float16 scales would
underflow for tiny channels and overflow for huge ones. Float payloads are reinterpreted with
``Tensor.view(torch.uint8)``, so all ranks must share a byte order (they do: one kind of machine).

``should_compress`` keeps small buffers exact: below ``MIN_COMPRESSED_BYTES`` a transfer is latency
bound, so compressing would save no time and cost precision; this covers the GroupNorm moments
[2, B, G] (float32, precision-critical, a few KiB). Only float32/float16/bfloat16 buffers of rank 3
or 4 are ever compressed, and a float format only when it is narrower than the source.

Residual compression with error feedback (``+residual``)
    Sender and receivers hold, per key, a reference r (per rank on the receivers) that starts at
    zero. To publish x_k the sender sends Q(d_k) with d_k = x_k - r_{k-1}, then sets
    r_k = r_{k-1} + D(Q(d_k)), decoding its own wire exactly as a receiver does; every receiver
    applies the same addition to the same previous value, so sender reference and receiver
    reconstruction are bit-identical (``observe_exact`` re-establishes that after a blocking exact
    exchange). The receiver's error is then x_k - r_k = d_k - D(Q(d_k)): the quantisation error of
    ONE step's delta, at most half a scale per channel. Nothing accumulates, because whatever
    Q missed at step k is part of d_{k+1} and is sent again. (Sending Q(x_k - x_{k-1}) instead, with
    no feedback, lets the receiver's copy random-walk away from x_k.) The first use of a key sends
    the whole value against a zero reference; a still buffer then converges by a factor ~254 (int8)
    or ~14 (int4) per step.

    State is kept in the buffer's own dtype on its own device: the receiver's copy is the tensor the
    layer reads, with no extra float32 copy per rank. Rounding the reference to float16/bfloat16
    adds at most half an ulp per step, and that too lands in the next delta and is re-sent, so the
    error stays at (one step's quantisation error + half an ulp), the floor a plain cast to that
    dtype has anyway (tests/test_exchange_codec.py follows a bfloat16 buffer over 20 steps).

``decode`` of a residual key updates state: call it exactly once per received wire, in order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

DTYPES = ("native", "float16", "bfloat16", "int8", "int4")
ALLOWED_VALUES = (
    "native", "float16", "bfloat16", "int8",
    "float16+residual", "bfloat16+residual", "int8+residual", "int4+residual",
)
"""What ``--exchange-dtype`` accepts."""

MIN_COMPRESSED_BYTES = int(os.environ.get("DISTRIFUSION_MIN_COMPRESSED_BYTES", 64 * 1024))
"""Buffers smaller than this (in the source dtype) always travel exact. The environment variable lowers it
for tests and benchmarks on small models (0: compress every K/V and halo buffer, as at full size); rank
processes inherit it."""

COMPRESSIBLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SCALE_DTYPE = torch.float32
FLOAT16_MAX = 65504.0

_FLOAT_FORMATS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_INT_LEVELS = {"int8": 127, "int4": 7}  # largest |q|: symmetric, so zero is exact
_SCALE_ALIGNMENT = 4  # scales start on a float32 boundary
_NIBBLE_OFFSET = 8


@dataclass(frozen=True)
class CodecSpec:
    """One ``--exchange-dtype`` value: the wire format and whether deltas (residuals) are sent."""

    dtype: str = "native"
    residual: bool = False

    def __post_init__(self):
        if self.text not in ALLOWED_VALUES:
            raise ValueError(_parse_error(self.text))

    @classmethod
    def parse(cls, text: str) -> "CodecSpec":
        """``"int8+residual"`` -> CodecSpec("int8", True); ValueError naming the option otherwise."""
        value = str(text).strip().lower()
        if value not in ALLOWED_VALUES:
            raise ValueError(_parse_error(value))
        dtype, _, suffix = value.partition("+")
        return cls(dtype, suffix == "residual")

    @property
    def text(self) -> str:
        return f"{self.dtype}+residual" if self.residual else self.dtype

    def __str__(self) -> str:
        return self.text

    @property
    def lossless(self) -> bool:
        return self.dtype == "native"

    def compresses(self, shape, dtype: torch.dtype) -> bool:
        """Whether a buffer of this shape and dtype travels in this spec's format (else: native)."""
        if self.lossless or not should_compress(shape, dtype):
            return False
        narrower = _FLOAT_FORMATS.get(self.dtype)
        return narrower is None or narrower.itemsize < dtype.itemsize

    def wire_nbytes(self, shape, source_dtype: torch.dtype) -> int:
        """Length of the wire tensor for a buffer of ``shape`` and ``source_dtype``."""
        numel = math.prod(shape)
        if not self.compresses(shape, source_dtype):
            return numel * source_dtype.itemsize
        if self.dtype in _FLOAT_FORMATS:
            return numel * _FLOAT_FORMATS[self.dtype].itemsize
        fmt = self.format_for(shape)
        return _scales_offset(fmt, numel) + _scale_count(fmt, shape) * SCALE_DTYPE.itemsize

    def format_for(self, shape) -> str:
        """The wire format of a compressed buffer of ``shape``: the spec's, except that halo rows (4-D)
        travel as int8 under int4."""
        return "int8" if self.dtype == "int4" and len(shape) == 4 else self.dtype


NATIVE = CodecSpec()


def _parse_error(value: str) -> str:
    hint = " (int4 only as int4+residual: too coarse for raw activations)" if value == "int4" else ""
    return f"--exchange-dtype: unknown value {value!r}{hint}; choose one of {', '.join(ALLOWED_VALUES)}"


def channel_axis(shape) -> int | None:
    """The dim that gets its own scales: 1 for NCHW halo payloads (4-D), the last for token buffers
    [B, T, C] (3-D); None (the whole buffer is one channel) otherwise."""
    if len(shape) == 4:
        return 1
    if len(shape) == 3:
        return 2
    return None


def channel_count(shape) -> int:
    axis = channel_axis(shape)
    return 1 if axis is None else shape[axis]


def should_compress(shape, dtype: torch.dtype, min_bytes: int | None = None) -> bool:
    """Only large float buffers of rank 3 or 4 (K/V, halo rows) are compressed; small ones (GroupNorm
    moments among them) are latency-bound and travel exact. ``min_bytes`` defaults to the module's
    MIN_COMPRESSED_BYTES, read at the call (a benchmark lowers it to compress a small model's buffers
    as a full-size model's would be)."""
    if dtype not in COMPRESSIBLE_DTYPES or channel_axis(shape) is None:
        return False
    return math.prod(shape) * dtype.itemsize >= (MIN_COMPRESSED_BYTES if min_bytes is None else min_bytes)


def compression_ratio(spec: CodecSpec, shape, dtype: torch.dtype) -> float:
    """Source bytes / wire bytes of one buffer."""
    return math.prod(shape) * dtype.itemsize / spec.wire_nbytes(shape, dtype)


# --- stateless payload coding ---


def pack(values: torch.Tensor, spec: CodecSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` in ``spec``'s format as a flat uint8 wire tensor (written into ``out[:n]`` if given).

    The caller decides whether the buffer is compressed at all (``CodecSpec.compresses``)."""
    if spec.dtype in _FLOAT_FORMATS:
        wire = _bytes_of(_cast(values, _FLOAT_FORMATS[spec.dtype]))
    elif spec.dtype in _INT_LEVELS:
        return _pack_quantized(values, spec.format_for(values.shape), out)
    else:
        wire = _bytes_of(values)
    if out is None:
        return wire
    out[: wire.numel()].copy_(wire)
    return out[: wire.numel()]


def unpack(wire: torch.Tensor, shape, dtype: torch.dtype, spec: CodecSpec) -> torch.Tensor:
    """The values a wire tensor carries, shaped ``shape``: float32 for int formats, the cast dtype for
    float formats, ``dtype`` for native. ``wire`` may be longer (a padded slot)."""
    shape = tuple(shape)
    if spec.dtype in _FLOAT_FORMATS:
        return _reinterpret(wire, _FLOAT_FORMATS[spec.dtype], math.prod(shape)).view(shape)
    if spec.dtype in _INT_LEVELS:
        return _unpack_quantized(wire, shape, spec.format_for(shape))
    return _reinterpret(wire, dtype, math.prod(shape)).view(shape)


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float16 and values.dtype != torch.float16:
        values = values.clamp(-FLOAT16_MAX, FLOAT16_MAX)
    return values.to(dtype)


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _reinterpret(wire: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    raw = wire[: numel * dtype.itemsize]
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()  # viewing bytes as a wider dtype needs an aligned start
    return raw.view(dtype)


def _payload_nbytes(fmt: str, numel: int) -> int:
    return numel if fmt == "int8" else -(-numel // 2)


def _scales_offset(fmt: str, numel: int) -> int:
    return -(-_payload_nbytes(fmt, numel) // _SCALE_ALIGNMENT) * _SCALE_ALIGNMENT


def _scale_count(fmt: str, shape) -> int:
    """Scales on the wire: one per channel, and for int4 also one per token (every position but the channel)."""
    channels = channel_count(shape)
    return channels + (math.prod(shape) // channels if fmt == "int4" else 0)


def _broadcastable(scales: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    if axis is not None:
        shape[axis] = scales.numel()
    return scales.view(shape)


def quantize(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel quantisation: (q as int8 in [-levels, levels], float32 scales [C])."""
    x = values.float()
    axis = channel_axis(x.shape)
    reduced = [d for d in range(x.ndim) if d != axis]
    scales = (x.abs().amax(dim=reduced) / levels).reshape(-1)
    q = torch.round(x / _broadcastable(_divisor(scales), axis, x.ndim)).clamp_(-levels, levels)
    return q.to(torch.int8), scales


def _divisor(scales: torch.Tensor) -> torch.Tensor:
    """``scales`` with zeros replaced by one: an all-zero channel or token quantises to q = 0."""
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of ``quantize``'s output."""
    return q.float() * _broadcastable(scales, channel_axis(q.shape), q.ndim)


def quantize_two_level(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel, then per-token quantisation of a token buffer [B, T, C]: (q as int8 in [-levels, levels],
    float32 channel scales [C] (max|x|), float32 token scales [B x T] (max over channels of |x| / channel
    scale, / levels)). Error: at most half a token scale x channel scale, never more than per-channel's."""
    x = values.float()
    channel = x.abs().amax(dim=(0, 1))
    y = x / _divisor(channel)
    token = y.abs().amax(dim=2, keepdim=True) / levels
    q = torch.round(y / _divisor(token)).clamp_(-levels, levels)
    return q.to(torch.int8), channel, token.reshape(-1)


def dequantize_two_level(q: torch.Tensor, channel: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """float32 values of ``quantize_two_level``'s output."""
    return q.float() * token.view(q.shape[0], q.shape[1], 1) * channel


def _pack_quantized(values: torch.Tensor, fmt: str, out: torch.Tensor | None) -> torch.Tensor:
    if fmt == "int4":
        q, channel, token = quantize_two_level(values, _INT_LEVELS[fmt])
        scales = torch.cat([channel, token])
    else:
        q, scales = quantize(values, _INT_LEVELS[fmt])
    payload = q.reshape(-1).view(torch.uint8) if fmt == "int8" else _pack_nibbles(q)
    start = _scales_offset(fmt, q.numel())
    total = start + scales.numel() * SCALE_DTYPE.itemsize
    wire = torch.empty(total, dtype=torch.uint8, device=values.device) if out is None else out[:total]
    wire[: payload.numel()].copy_(payload)
    wire[payload.numel() : start].zero_()
    wire[start:].copy_(scales.view(torch.uint8))
    return wire


def _unpack_quantized(wire: torch.Tensor, shape: tuple[int, ...], fmt: str) -> torch.Tensor:
    numel = math.prod(shape)
    start = _scales_offset(fmt, numel)
    scales = _reinterpret(wire[start:], SCALE_DTYPE, _scale_count(fmt, shape))
    payload = wire[: _payload_nbytes(fmt, numel)]
    if fmt == "int8":
        return dequantize(payload.view(torch.int8).view(shape), scales)
    channels = channel_count(shape)
    return dequantize_two_level(_unpack_nibbles(payload, numel).view(shape), scales[:channels], scales[channels:])


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    flat = (q.reshape(-1) + _NIBBLE_OFFSET).view(torch.uint8)  # 1..15 for q in -7..7
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), _NIBBLE_OFFSET)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1)
    return pairs.reshape(-1)[:numel].view(torch.int8) - _NIBBLE_OFFSET


# --- per-rank state ---


@dataclass
class ExchangeCodec:
    """Encodes what rank ``index`` of a group of ``size`` ranks publishes and decodes what the others
    published, keeping the residual references (``spec.residual``) per key."""

    spec: CodecSpec
    index: int
    size: int
    _references: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _reconstructions: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not 0 <= self.index < self.size:
            raise ValueError(f"rank index {self.index} outside a group of {self.size}")

    def wire_nbytes(self, shape, dtype: torch.dtype) -> int:
        return self.spec.wire_nbytes(shape, dtype)

    @torch.no_grad()
    def encode(self, key: str, fresh: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The wire tensor publishing ``fresh`` under ``key`` (written into ``out[:n]`` if given)."""
        if not self.spec.compresses(fresh.shape, fresh.dtype):
            return pack(fresh, NATIVE, out)
        if not self.spec.residual:
            return pack(fresh, self.spec, out)
        reference = self._held(self._references, key, fresh.shape, fresh.dtype, fresh.device)
        wire = pack(fresh.float() - reference, self.spec, out)
        reference.add_(unpack(wire, fresh.shape, fresh.dtype, self.spec))
        return wire

    @torch.no_grad()
    def decode(self, key: str, rank: int, wire: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        """Rank ``rank``'s buffer as the receivers reconstruct it from ``wire``.

        Residual: the returned tensor is this codec's state for (key, rank): read it, do not modify it;
        it changes at the next decode of the same key and rank. For ``rank == index`` it is the sender
        reference (what the others reconstruct of this rank), and ``wire`` is not applied again."""
        shape = tuple(shape)
        if not self.spec.compresses(shape, dtype):
            return unpack(wire, shape, dtype, NATIVE)
        if not self.spec.residual:
            return unpack(wire, shape, dtype, self.spec).to(dtype)
        if rank == self.index:
            return self._own_reference(key)
        reconstruction = self._held(self._reconstructions, (key, rank), shape, dtype, wire.device)
        return reconstruction.add_(unpack(wire, shape, dtype, self.spec))

    @torch.no_grad()
    def observe_exact(self, key: str, tensors: list[torch.Tensor]) -> None:
        """A blocking exact exchange of ``key`` delivered ``tensors`` (one per rank): sender reference
        and receiver reconstructions become exactly these values, on every rank alike."""
        if len(tensors) != self.size:
            raise ValueError(f"{key}: {len(tensors)} tensors for a group of {self.size}")
        if not self.spec.residual:
            return
        for rank, tensor in enumerate(tensors):
            store, slot = (self._references, key) if rank == self.index else (self._reconstructions, (key, rank))
            if self.spec.compresses(tensor.shape, tensor.dtype):
                _overwrite(store, slot, tensor)
            else:
                store.pop(slot, None)

    def reset(self) -> None:
        """Forgets every reference (a new generation starts from zero references)."""
        self._references.clear()
        self._reconstructions.clear()

    def reference(self, key: str) -> torch.Tensor | None:
        """This rank's sender reference for ``key`` (what the receivers hold of it), if any."""
        return self._references.get(key)

    def reconstruction(self, key: str, rank: int) -> torch.Tensor | None:
        """This rank's reconstruction of rank ``rank``'s buffer ``key``, if any."""
        return self._reconstructions.get((key, rank))

    def _own_reference(self, key: str) -> torch.Tensor:
        reference = self._references.get(key)
        if reference is None:
            raise ValueError(f"{key}: decoding this rank's own buffer before it was ever encoded")
        return reference

    @staticmethod
    def _held(store: dict, slot, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # A buffer that changed shape, dtype or device starts again from a zero reference; sender and
        # receivers see the same change at the same exchange, so they restart together.
        held = store.get(slot)
        if held is None or not _matches(held, shape, dtype, device):
            held = store[slot] = torch.zeros(shape, dtype=dtype, device=device)
        return held


def _matches(tensor: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> bool:
    return tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype and tensor.device == device


def _overwrite(store: dict, slot, tensor: torch.Tensor) -> None:
    held = store.get(slot)
    if held is not None and _matches(held, tensor.shape, tensor.dtype, tensor.device):
        held.copy_(tensor)
    else:
        store[slot] = tensor.detach().clone(memory_format=torch.contiguous_format)
