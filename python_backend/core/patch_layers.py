"""Patch-aware replacements for the layers of a diffusers UNet that look across slab borders.

Each wrapper keeps the original layer's weights, publishes what the other slabs need, asks the
``PatchContext`` for the other slabs' data and computes with ``patch_math``. ``patch_unet`` swaps
them into a UNet in place; the UNet's own forward then runs unchanged on this rank's slab.
"""

from __future__ import annotations

import torch
from torch import nn

from . import patch_math
from .context import PatchContext
from .tracing import building_a_graph


class PatchConv2d(nn.Module):
    """A convolution with kernel height > 1 on a slab: borrows halo rows from the neighbours."""

    def __init__(self, conv: nn.Conv2d, key: str, context: PatchContext):
        super().__init__()
        self.conv = conv
        self.key = key
        self.context = context
        self.halo = patch_math.Halo.of(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context.alone:
            return self.conv(x)  # the layer's own zero padding at the slab's borders (one slab: the map's)
        if x.shape[2] < max(self.halo.top, self.halo.bottom):
            raise ValueError(f"{self.key}: a slab of {x.shape[2]} rows is thinner than the halo {self.halo}")
        payload = patch_math.halo_payload(x, self.halo)
        payloads = self.context.activations(self.key, payload, [tuple(payload.shape)] * self.context.layout.num_patches,
                                            neighbours_only=True)
        above, below = patch_math.neighbour_rows(payloads, self.context.index, self.halo, x)
        return patch_math.conv_rows(self.conv, self.context.concatenated("halo frame", [above, x, below], dim=2))


class SlicedInputConv(nn.Module):
    """``conv_in``: reads the full fresh latent and computes only this rank's output rows."""

    def __init__(self, conv: nn.Conv2d, context: PatchContext):
        super().__init__()
        self.conv = conv
        self.context = context
        self.halo = patch_math.Halo.of(conv)

    def forward(self, full: torch.Tensor) -> torch.Tensor:
        start, stop = self.context.layout.row_range(full.shape[2])
        if self.context.alone:
            return self.conv(full[:, :, start:stop])
        return patch_math.conv_rows(self.conv, patch_math.slice_with_halo(full, start, stop, self.halo))


class PatchGroupNorm(nn.Module):
    """GroupNorm whose statistics cover the whole map, per the context's mode."""

    def __init__(self, norm: nn.GroupNorm, key: str, context: PatchContext):
        super().__init__()
        self.norm = norm
        self.key = key
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fresh = patch_math.group_moments(x, self.norm.num_groups)
        mean, var = self.context.group_norm_moments(self.key, fresh)
        return patch_math.group_normalize(x, self.norm, mean, var)


class PatchSelfAttentionProcessor:
    """A diffusers attention processor for self-attention over the whole image's tokens.

    Queries are local; keys and values of the other slabs come from the context. The tokens of a
    slab are contiguous in raster order, so the full sequence is the slabs' tokens in rank order. The
    key and value projections run as one matrix product whose output is the buffer that is exchanged.
    """

    def __init__(self, key: str, context: PatchContext):
        self.key = key
        self.context = context
        self.fused = FusedKeyValue()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.key}: the patch self-attention takes no encoder states or mask")
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(f"{self.key}: only token-sequence self-attention (as in transformer blocks) is supported")
        residual = hidden_states
        query = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            query = _per_head(attn.norm_q, query, attn.heads)
        if attn.norm_k is None:
            key_value = self.fused(attn, hidden_states)
        else:  # the key is normalised on its own before it travels
            key_value = torch.cat([_per_head(attn.norm_k, attn.to_k(hidden_states), attn.heads),
                                   attn.to_v(hidden_states)], dim=-1)
        out = attend_over_all_slabs(self.context, self.key, query, key_value, attn.heads, attn.scale)
        return _attention_output(attn, out, residual)


class CachedCrossAttentionProcessor:
    """Cross-attention whose keys and values, which depend only on the text, are computed once per
    generation (per layer; with the CFG split each rank caches its own half) instead of every step.

    The cache is keyed by the context's generation and the text tensor itself, so a new generation or
    new conditioning recomputes it. While segment graphs are exported, the context's
    ``text_key_values`` hands them in instead (there they are graph inputs, made once per generation by the
    text key/value graph); a graph traced without one computes them from its text input. Anything this
    processor does not cover (masks, cross-attention norms, spatial norms) goes to the layer's own processor."""

    def __init__(self, key: str, context: PatchContext, fallback):
        self.key = key
        self.context = context
        self.fallback = fallback
        self._cached: tuple | None = None  # (generation and text tensor identity, (key, value))

    @staticmethod
    def covers(attn, hidden_states, attention_mask=None) -> bool:
        """Whether this processor computes the call itself (else the layer's own processor does)."""
        return (attention_mask is None and not attn.norm_cross and attn.spatial_norm is None
                and attn.group_norm is None and hidden_states.ndim == 3)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None or not self.covers(attn, hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        residual = hidden_states
        query = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            query = _per_head(attn.norm_q, query, attn.heads)
        key, value = self._text_key_value(attn, encoder_hidden_states)
        out = patch_math.attention(query, key, value, attn.heads, attn.scale)
        return _attention_output(attn, out, residual)

    def _text_key_value(self, attn, text: torch.Tensor):
        if self.context.text_key_values is not None:
            return self.context.text_key_values.key_value(self.key, attn, text)
        if building_a_graph():
            return text_key_value(attn, text)  # symbolic values: nothing to cache
        identity = (self.context.generation, text.data_ptr(), text._version, tuple(text.shape), text.dtype, text.device)
        if self._cached is None or self._cached[0] != identity:
            self._cached = (identity, text_key_value(attn, text))
        return self._cached[1]


def text_key_value(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A cross-attention layer's keys and values of the text (the key normalised per head where the layer
    does): what is computed once per generation."""
    key = attn.to_k(text)
    if attn.norm_k is not None:
        key = _per_head(attn.norm_k, key, attn.heads)
    return key, attn.to_v(text)


class FusedKeyValue:
    """``[to_k(x), to_v(x)]`` as one matrix product: the two projections' weights side by side, made once
    per weight storage, device and dtype (so moving or reloading the model remakes it)."""

    def __init__(self):
        self._made_from: tuple | None = None
        self._weight = self._bias = None

    def __call__(self, attn, hidden_states: torch.Tensor) -> torch.Tensor:
        k, v = attn.to_k, attn.to_v
        if type(k) is not nn.Linear or type(v) is not nn.Linear:  # adapters (LoRA) run as they are
            return torch.cat([k(hidden_states), v(hidden_states)], dim=-1)
        if building_a_graph():
            # a graph being exported: the concatenated weights are written inline (the exporter folds
            # them into one constant), nothing is cached from traced values
            return nn.functional.linear(hidden_states, torch.cat([k.weight, v.weight]), _fused_bias(k, v))
        source = (k.weight.data_ptr(), v.weight.data_ptr(), k.weight._version, v.weight._version,
                  k.weight.device, k.weight.dtype)
        if source != self._made_from:
            self._weight = torch.cat([k.weight, v.weight]).detach()
            bias = _fused_bias(k, v)
            self._bias = None if bias is None else bias.detach()
            self._made_from = source
        return nn.functional.linear(hidden_states, self._weight, self._bias)


def _fused_bias(k: nn.Linear, v: nn.Linear) -> torch.Tensor | None:
    if k.bias is None and v.bias is None:
        return None
    return torch.cat([_bias_or_zeros(k), _bias_or_zeros(v)])


def _bias_or_zeros(linear: nn.Linear) -> torch.Tensor:
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


def _attention_output(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def attend_over_all_slabs(context: PatchContext, layer_key: str, query, key_value, heads: int,
                          scale: float | None = None) -> torch.Tensor:
    """This slab's queries over every slab's keys and values, which travel as one buffer per layer
    (``key_value``: [B, T, 2C], keys then values; the slabs' tokens in rank order)."""
    shapes = [(key_value.shape[0], t, key_value.shape[2]) for t in context.layout.scaled(key_value.shape[1])]
    gathered = context.concatenated("keys and values", context.activations(layer_key, key_value, shapes), dim=1)
    full_key, full_value = gathered.split(key_value.shape[-1] // 2, dim=-1)
    return patch_math.attention(query, full_key, full_value, heads, scale)


def swap_layers(root: nn.Module, replacement, prefix: str = "") -> None:
    """Replaces, in place, every child ``c`` of ``root`` (at any depth) for which ``replacement(key, c)``
    returns a module; ``key`` is the child's dotted name (after ``prefix``)."""
    swaps = []
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            key = ".".join(part for part in (prefix, name, child_name) if part)
            wrapper = replacement(key, child)
            if wrapper is not None:
                swaps.append((module, child_name, wrapper))
    for module, child_name, wrapper in swaps:
        setattr(module, child_name, wrapper)


def _per_head(norm: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = x.shape
    return norm(x.view(batch, tokens, heads, inner // heads)).view(batch, tokens, inner)


def patch_unet(unet: nn.Module, context: PatchContext) -> nn.Module:
    """Replaces, in place, every layer of ``unet`` that reads across slab borders.

    conv_in becomes a sliced-input conv; every other conv with kernel height > 1 a halo conv; every
    GroupNorm a whole-map GroupNorm; every self-attention a whole-image attention (keys and values
    projected together); every cross-attention caches its text keys and values per generation.
    Returns ``unet``.
    """
    from diffusers.models.attention_processor import Attention

    if any(isinstance(m, (PatchConv2d, SlicedInputConv, PatchGroupNorm)) for m in unet.modules()):
        raise ValueError("this UNet is already patched")

    def replacement(key: str, child: nn.Module):
        if key == "conv_in":
            return SlicedInputConv(child, context)
        if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 1:
            return PatchConv2d(child, key, context)
        if isinstance(child, nn.GroupNorm):
            return PatchGroupNorm(child, key, context)
        if isinstance(child, Attention) and not child.is_cross_attention:
            child.set_processor(PatchSelfAttentionProcessor(key, context))
        elif isinstance(child, Attention):
            child.set_processor(CachedCrossAttentionProcessor(key, context, child.processor))
        return None

    swap_layers(unet, replacement)
    return unet
