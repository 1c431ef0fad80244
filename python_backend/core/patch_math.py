"""What a patch-aware layer computes from its own slab and the other slabs' data.

Pure tensor functions: no communication, no module state. The caller decides whether the other
slabs' data is fresh or from the previous step (see ``context.py``); the results here do not care.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# --- convolution halos ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Halo:
    """Rows a convolution reads above and below each output row's input window."""

    top: int
    bottom: int

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> "Halo":
        k = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
        pad = conv.padding[0]
        if isinstance(conv.padding, str):
            raise ValueError(f"string padding {conv.padding!r} is not supported for patch convolutions")
        return cls(top=pad, bottom=k - 1 - pad)

    @property
    def rows(self) -> int:
        return self.top + self.bottom


def halo_payload(x: torch.Tensor, halo: Halo) -> torch.Tensor:
    """The rows a slab publishes: its first ``bottom`` rows (for the rank above) and its last ``top``
    rows (for the rank below)."""
    first = x[:, :, : halo.bottom]
    last = x[:, :, x.shape[2] - halo.top :]
    return torch.cat([first, last], dim=2)


def neighbour_rows(payloads: list[torch.Tensor], index: int, halo: Halo, like: torch.Tensor):
    """Rows to stack above and below slab ``index`` from every slab's published payload.

    The global top and bottom get zeros, as the convolution's own zero padding would."""
    shape = (like.shape[0], like.shape[1], None, like.shape[3])
    if index > 0:
        above = payloads[index - 1][:, :, halo.bottom :]
    else:
        above = like.new_zeros(shape[0], shape[1], halo.top, shape[3])
    if index < len(payloads) - 1:
        below = payloads[index + 1][:, :, : halo.bottom]
    else:
        below = like.new_zeros(shape[0], shape[1], halo.bottom, shape[3])
    return above, below


def conv_rows(conv: torch.nn.Conv2d, padded: torch.Tensor) -> torch.Tensor:
    """``conv`` applied to a slab that already carries its vertical halo rows."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported for patch convolutions")
    return F.conv2d(
        padded,
        conv.weight,
        conv.bias,
        stride=conv.stride,
        padding=(0, conv.padding[1]),
        dilation=conv.dilation,
        groups=conv.groups,
    )


def slice_with_halo(full: torch.Tensor, start: int, stop: int, halo: Halo) -> torch.Tensor:
    """Rows [start - top, stop + bottom) of a full map, zero-filled beyond its top and bottom."""
    padded = F.pad(full, (0, 0, halo.top, halo.bottom))
    return padded[:, :, start : stop + halo.rows]


# --- self-attention ------------------------------------------------------------------------------


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
              scale: float | None = None) -> torch.Tensor:
    """Multi-head attention of local queries [B, Tq, C] over all keys/values [B, Tk, C] (``scale``: the
    layer's, default 1/sqrt(head dim))."""
    batch, tokens, inner = query.shape
    head_dim = inner // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False, scale=scale)
    return out.transpose(1, 2).reshape(batch, tokens, inner).to(query.dtype)


# --- GroupNorm statistics ------------------------------------------------------------------------


def group_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-(sample, group) [E[x], E[x^2]] of a slab in float32, shape [2, B, G]."""
    flat = x.reshape(x.shape[0], groups, -1).float()
    return torch.stack([flat.mean(dim=-1), flat.square().mean(dim=-1)])


def weighted_moments(moments: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Moments of the whole map from each slab's moments, weighted by element count: one term per slab
    with Python float weights, which a graph traced with ``torch.export`` can hold (a weights tensor made
    inside it becomes a lifted constant that the ONNX export refuses). The synchronous steps use it (the
    VAE decoder's pieces are traced from them); the asynchronous ones, run for every GroupNorm of every
    step, use ``weighted_sum`` over the stacked moments instead."""
    total = moments[0] * weights[0]
    for m, w in zip(moments[1:], weights[1:]):
        total = total + m * w
    return total


def corrected_moments(stale: torch.Tensor, fresh: torch.Tensor, index: int, weights: torch.Tensor) -> torch.Tensor:
    """Stale global moments (from the stacked stale slab moments [N, 2, B, G]) shifted by how much this
    slab's moments moved since the last step."""
    return weighted_sum(weights, stale) + (fresh - stale[index])


VARIANCE_FLOOR_SHARE = 0.5
"""Share of the within-slab variance that a corrected variance may not fall below. The bound is itself
built from stale moments, so it guards at half its value and leaves a plausible estimate alone; on the
trained model (24 held-out captions, N = 2, 4, 8) 0.5 beat 0.25 and 1; without a floor one caption's
latents blew up at N = 4 (relative error 2.66), and a bare clamp at zero gave NaN at N = 8 (docs/quality.md)."""


def within_slab_variance(moments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The element-weighted mean of each slab's own variance, from stacked slab moments [N, 2, B, G] and
    weights [N]: a lower bound on the whole map's variance (law of total variance: the whole variance adds
    the spread of the slab means to it). One pass over the stack, whatever N: this runs in every step."""
    own = moments[:, 1] - moments[:, 0].square()
    return weighted_sum(weights, own).clamp_min(0)


def weighted_sum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``sum_r weights[r] * stacked[r]`` for stacked slab data [N, ...] and float32 ``weights`` [N]: a product
    and a sum whatever N (two graph nodes when exported, where ``tensordot`` becomes a dozen shape
    operations around an Einsum)."""
    return (weights.view((-1,) + (1,) * (stacked.ndim - 1)) * stacked).sum(dim=0)


def variance(moments: torch.Tensor) -> torch.Tensor:
    """Biased variance E[x^2] - E[x]^2."""
    return moments[1] - moments[0].square()


def corrected_variance(moments: torch.Tensor, local: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The corrected moments' variance: where negative, the slab's own (``local`` moments, DESIGN.md);
    elsewhere at least ``floor``."""
    var = variance(moments)
    return torch.where(var < 0, variance(local), torch.maximum(var, floor))


def group_normalize(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
    """Applies GroupNorm with given per-(sample, group) mean and variance [B, G] (float32).

    As torch's own kernel does: the normalization and the affine transform fold into one scale and one
    shift per (sample, channel), computed in float32, so ``x`` is read once (``x * scale + shift``)
    instead of once per elementwise step; the result has ``x``'s dtype."""
    batch, groups = mean.shape
    scale = torch.rsqrt(var + norm.eps)[:, :, None]  # [B, G, 1]
    if norm.affine:
        scale = scale * norm.weight.float().view(1, groups, -1)  # [B, G, C / G]
        shift = norm.bias.float().view(1, groups, -1) - mean[:, :, None] * scale
    else:
        shift = -mean[:, :, None] * scale
    flat = x.reshape(batch, groups, x.shape[1] // groups, -1)
    return torch.addcmul(shift[..., None], flat, scale[..., None]).reshape(x.shape).to(x.dtype)
