"""Patch-parallel VAE decoding: every rank decodes its own latent slab, and no device holds the
full-resolution decoder activations.

The decoder's layers that look across slab borders are swapped for the same patch-aware layers the
UNet uses (halo convolutions, whole-map GroupNorm, whole-image self-attention), run in a synchronous
context: decoding happens once per image, so every exchange is a blocking all-gather of this step's
data and the result is exact. Nearest-neighbour upsampling maps each row to two rows of its own slab,
so slab borders stay aligned at every level, and 1x1 convolutions are row-local. The ranks' image
slabs are gathered in rank (= row) order at the end.
"""

from __future__ import annotations

import torch
from torch import nn

from .context import PatchContext
from .exchange import BufferExchange
from .layout import PatchLayout
from .model import vae_decode
from .modes import Mode
from .patch_layers import FusedKeyValue, PatchConv2d, PatchGroupNorm, attend_over_all_slabs, swap_layers


class PatchSpatialAttentionProcessor:
    """The VAE's spatial self-attention ([B, C, H, W] in and out, its own GroupNorm, a residual) over the
    whole image: queries from this slab, keys and values from every slab."""

    def __init__(self, key: str, context: PatchContext):
        self.key = key
        self.context = context
        self.fused = FusedKeyValue()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError(f"{self.key}: the patch spatial attention takes no encoder states, mask or spatial norm")
        if hidden_states.ndim != 4:
            raise ValueError(f"{self.key}: expected a [B, C, H, W] map, got {tuple(hidden_states.shape)}")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        tokens = hidden_states.view(batch, channels, height * width)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens)  # a PatchGroupNorm: statistics of the whole map
        tokens = tokens.transpose(1, 2)
        query = attn.to_q(tokens)
        out = attend_over_all_slabs(self.context, self.key, query, self.fused(attn, tokens), attn.heads, attn.scale)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def patch_vae_decoder(vae: nn.Module, context: PatchContext) -> nn.Module:
    """Replaces, in place, every layer of ``vae.decoder`` that reads across slab borders (convolutions
    with kernel height > 1, GroupNorms, self-attention). Returns ``vae``."""
    from diffusers.models.attention_processor import Attention

    decoder = vae.decoder
    if any(isinstance(m, (PatchConv2d, PatchGroupNorm)) for m in decoder.modules()):
        raise ValueError("this VAE decoder is already patched")
    def replacement(key: str, child: nn.Module):
        if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 1:
            return PatchConv2d(child, key, context)
        if isinstance(child, nn.GroupNorm):
            return PatchGroupNorm(child, key, context)
        if isinstance(child, Attention):
            child.set_processor(PatchSpatialAttentionProcessor(key, context))
        return None

    swap_layers(decoder, replacement, prefix="decoder")
    return vae


def decoder_layout(latent_height: int, num_patches: int, index: int, unit_rows: int = 1) -> PatchLayout:
    """The slabs the decoder splits a latent of ``latent_height`` rows into: the denoiser's (whole units of
    its ``unit_rows``) where the height has a unit for every slab, else as evenly as single rows allow
    (the denoiser's CFG halves each split the image over half the ranks; the decoder uses them all).
    Raises ``LayoutError`` naming the most slabs this height allows: every slab needs at least one latent
    row, since the decoder's 3x3 convolutions borrow one halo row from each neighbour."""
    if unit_rows > 1 and latent_height % unit_rows == 0 and latent_height // unit_rows >= num_patches:
        return PatchLayout.split(latent_height, num_patches, unit_rows, index)
    return PatchLayout.split(latent_height, num_patches, 1, index)


class ParallelVaeDecoder:
    """Decodes final latents on every rank of ``group`` together: each rank its slab, exactly.

    Every rank calls :meth:`decode` with the same full latents; each returns the whole image (the slabs
    gathered in order). ``group`` is a torch.distributed group (None with a single rank). With
    ``engine`` (this rank's ``engines.vae_segments.SegmentedVaeDecoder``), the slab is decoded by the
    built pieces and ``vae`` may be None; else ``vae`` is patched and runs eagerly. ``exchange``
    replaces the group's (``exchange.LoneRankExchange``: one rank decoding alone)."""

    def __init__(self, vae: nn.Module | None, group, index: int, size: int, engine=None, exchange=None):
        if vae is None and engine is None:
            raise ValueError("a parallel decoder needs a VAE or its built engines")
        self.vae, self.engine = vae, engine
        self.exchange = exchange or BufferExchange(group, index, size, record=False, retain=False)
        # no workspace: one pass per request through many shapes, whose scratch would outlive the decode
        self.context = PatchContext(decoder_layout(size, size, index), self.exchange, mode=Mode.FULL_SYNC,
                                    warmup_steps=0, workspace=None)
        if engine is None:
            patch_vae_decoder(vae, self.context)

    @property
    def size(self) -> int:
        return self.exchange.size

    def decode(self, latents: torch.Tensor, unit_rows: int = 1) -> torch.Tensor:
        """The image [B, 3, H, W] in [-1, 1] of full latents [B, C, h, w] (as ``model.vae_decode``), the
        slabs cut as :func:`decoder_layout` says."""
        layout = decoder_layout(latents.shape[2], self.size, self.exchange.index, unit_rows)
        self.context.layout = layout
        self.context.begin_generation()
        start, stop = layout.row_range(latents.shape[2])
        if self.engine is not None:
            self.engine.check(tuple(latents.shape), (start, stop))
            image_slab = self.engine.decode_slab(latents[:, :, start:stop], self.exchange)
        else:
            image_slab = vae_decode(self.vae, latents[:, :, start:stop])
        shapes = [tuple(image_slab.shape[:2]) + (rows, image_slab.shape[3])
                  for rows in layout.scaled(image_slab.shape[2])]
        slabs = self.exchange.gather("decoder.image", image_slab.contiguous(), shapes)
        self.context.end_generation()
        return torch.cat(slabs, dim=2)
