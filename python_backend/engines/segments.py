"""The UNet cut into segments: pure functions of activations, embeddings and stale buffers.

A *stage* is one piece of diffusers' UNet forward: ``down{i}`` (conv_in joins ``down0``), ``mid``,
``up{i}`` (conv_out joins the last). A *segment* is a run of consecutive stages; the default cut is
one stage per segment. Each segment reads named tensors ("sample" or "hidden", "temb", "text",
"skip{j}") and writes named tensors ("hidden" or "noise", "skip{j}"). The patch-aware layers inside
are the same modules the eager path runs; when a segment is exported, ``SegmentIO`` stands in for
the exchange so that their stale buffers become inputs and their fresh buffers outputs, and
``TextKeyValueInputs`` for the cross-attention layers' per-generation cache so that their text keys and
values become inputs too (``TextKeyValues`` is the graph that makes them, once per generation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.patch_layers import CachedCrossAttentionProcessor, text_key_value


@dataclass(frozen=True)
class Segment:
    name: str
    stages: tuple[str, ...]
    inputs: tuple[str, ...]  # activation inputs, in order
    outputs: tuple[str, ...]  # activation outputs, in order


def stage_names(unet) -> list[str]:
    return [f"down{i}" for i in range(len(unet.down_blocks))] + ["mid"] + [
        f"up{i}" for i in range(len(unet.up_blocks))
    ]


def _skip_flow(unet) -> dict[str, tuple[list[str], list[str]]]:
    """For each stage, the skip tensors it produces and consumes (diffusers' skip stack, unrolled)."""
    flow, stack, count = {}, [], 0
    for i, block in enumerate(unet.down_blocks):
        made = 1 if i == 0 else 0  # conv_in's output is the first skip
        made += len(block.resnets) + (1 if block.downsamplers is not None else 0)
        names = [f"skip{count + k}" for k in range(made)]
        count += made
        stack += names
        flow[f"down{i}"] = (names, [])
    flow["mid"] = ([], [])
    for i, block in enumerate(unet.up_blocks):
        taken = stack[-len(block.resnets):]
        stack = stack[: -len(block.resnets)]
        flow[f"up{i}"] = ([], taken)
    return flow


def parse_cut(unet, cut: str | None) -> list[list[str]]:
    """``"down0+down1,mid,up0+up1+up2"`` -> stage groups; None -> one stage per segment."""
    names = stage_names(unet)
    if not cut:
        return [[n] for n in names]
    groups = [[s.strip() for s in part.split("+")] for part in cut.split(",")]
    if [s for g in groups for s in g] != names:
        raise ValueError(f"a cut must list every stage once, in order: {','.join(names)}; got {cut!r}")
    return groups


def partition(unet, cut: str | None = None) -> list[Segment]:
    flow = _skip_flow(unet)
    last_up = f"up{len(unet.up_blocks) - 1}"
    segments = []
    for group in parse_cut(unet, cut):
        produced = [s for stage in group for s in flow[stage][0]]
        consumed = [s for stage in group for s in flow[stage][1]]
        inputs = ["sample" if group[0] == "down0" else "hidden", "temb", "text"]
        inputs += [s for s in consumed if s not in produced]
        outputs = ["noise" if group[-1] == last_up else "hidden"]
        outputs += [s for s in produced if s not in consumed]
        segments.append(Segment("+".join(group), tuple(group), tuple(inputs), tuple(outputs)))
    return segments


class TimeEmbedding(nn.Module):
    """Time (and SDXL's added text/size) embedding: timestep [B], text_embeds, time_ids -> temb."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, timestep: torch.Tensor, text_embeds=None, time_ids=None) -> torch.Tensor:
        unet = self.unet
        proj = unet.time_proj(timestep).to(dtype=unet.dtype)
        emb = unet.time_embedding(proj, None)
        if text_embeds is not None:
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=None, added_cond_kwargs=added)
            if aug is not None:
                emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb


class SegmentModule(nn.Module):
    """Runs a segment's stages of a (patched) diffusers UNet on named tensors."""

    def __init__(self, unet, segment: Segment):
        super().__init__()
        self.unet = unet
        self.segment = segment
        self.flow = _skip_flow(unet)

    def forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        unet, t = self.unet, dict(tensors)
        temb, text = t["temb"], t["text"]
        for stage in self.segment.stages:
            if stage.startswith("down"):
                i = int(stage[4:])
                block = unet.down_blocks[i]
                if i == 0:
                    t["hidden"] = unet.conv_in(t["sample"])
                    t["skip0"] = t["hidden"]
                if getattr(block, "has_cross_attention", False):
                    hidden, res = block(hidden_states=t["hidden"], temb=temb, encoder_hidden_states=text)
                else:
                    hidden, res = block(hidden_states=t["hidden"], temb=temb)
                t["hidden"] = hidden
                made = self.flow[stage][0][1:] if i == 0 else self.flow[stage][0]
                t.update(zip(made, res))
            elif stage == "mid":
                if getattr(unet.mid_block, "has_cross_attention", False):
                    t["hidden"] = unet.mid_block(t["hidden"], temb, encoder_hidden_states=text)
                else:
                    t["hidden"] = unet.mid_block(t["hidden"], temb)
            else:
                i = int(stage[2:])
                block = unet.up_blocks[i]
                skips = tuple(t[name] for name in self.flow[stage][1])
                if getattr(block, "has_cross_attention", False):
                    t["hidden"] = block(hidden_states=t["hidden"], temb=temb, res_hidden_states_tuple=skips,
                                        encoder_hidden_states=text)
                else:
                    t["hidden"] = block(hidden_states=t["hidden"], temb=temb, res_hidden_states_tuple=skips)
                if i == len(unet.up_blocks) - 1:
                    hidden = t["hidden"]
                    if unet.conv_norm_out is not None:
                        hidden = unet.conv_act(unet.conv_norm_out(hidden))
                    t["noise"] = unet.conv_out(hidden)
        return {name: t[name] for name in self.segment.outputs}


@dataclass
class SegmentIO:
    """Stands in for the exchange inside a segment: stale buffers in, fresh buffers out.

    ``latest`` hands a layer the stale per-rank list it was given; ``start`` keeps what the layer
    publishes. A blocking ``gather`` cannot happen inside an engine, so it is an error here.
    """

    stale: dict[str, list[torch.Tensor]]
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0

    def latest(self, key: str) -> list[torch.Tensor]:
        return self.stale[key]

    def start(self, key: str, tensor: torch.Tensor, shapes) -> None:
        self.fresh[key] = tensor

    def flush(self) -> None:
        """Nothing travels inside a segment: its fresh buffers are graph outputs."""

    def gather(self, key, tensor, shapes):
        raise RuntimeError(f"{key}: a blocking exchange cannot run inside a segment engine")

    def drain(self) -> None:
        """Nothing is in flight inside a segment."""

    def reset(self) -> None:
        self.fresh.clear()


@dataclass
class ShapeRecorder:
    """Stands in for the exchange during one synchronous pass to learn each layer's buffer shapes."""

    shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    step: int = 0

    def gather(self, key, tensor, shapes):
        self.shapes[key] = [tuple(s) for s in shapes]
        self.dtypes[key] = tensor.dtype
        return [tensor.new_zeros(s) for s in shapes]

    def latest(self, key):
        return None

    def start(self, key, tensor, shapes):
        """A synchronous pass publishes through ``gather`` only."""

    def flush(self):
        """Nothing is queued."""

    def drain(self):
        """Nothing is in flight."""

    def reset(self):
        """The recorded shapes stay: they are what this stand-in is for."""


@dataclass
class TextKeyValueInputs:
    """Stands in for the cross-attention layers' per-generation cache inside a segment graph.

    With ``supplied`` (layer -> (key, value), the graph's inputs) a layer reads its text keys and values
    from there; without, they are computed from the text (a dry run, whose values are then the example
    inputs of the export). Either way ``read`` keeps what each layer got, in the order they asked."""

    supplied: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    read: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def key_value(self, layer: str, attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.read:
            self.read[layer] = text_key_value(attn, text) if self.supplied is None else self.supplied[layer]
        return self.read[layer]


def text_kv_names(layers) -> list[str]:
    """The graph names of ``layers``' text keys and values, key then value per layer: the text key/value
    graph's outputs and the segments' inputs."""
    return [f"text_{part}.{layer}" for layer in layers for part in ("key", "value")]


def cross_attention_layers(unet) -> dict[str, nn.Module]:
    """The patched UNet's cross-attention layers whose text keys and values are cached, by layer key."""
    return {processor.key: module for module in unet.modules()
            if isinstance(processor := getattr(module, "processor", None), CachedCrossAttentionProcessor)}


class TextKeyValues(nn.Module):
    """text -> every listed cross-attention layer's text keys and values (key0, value0, key1, ...): run once
    per generation, its outputs are the segments' ``text_key.{layer}`` / ``text_value.{layer}`` inputs."""

    def __init__(self, unet, layers: list[str]):
        super().__init__()
        attentions = cross_attention_layers(unet)
        self.attentions = nn.ModuleList(attentions[layer] for layer in layers)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t for attn in self.attentions for t in text_key_value(attn, text))
