"""Exports a rank's UNet segments to ONNX with static shapes and stale-buffer inputs.

Input and output names (stable, documented in docs/engines.md):
  activations  "sample" | "hidden", "temb", "text", "skip{j}"  ->  "hidden_out" | "noise", "skip{j}"
  buffers      "stale.{layer}.{r}" for every rank r of the patch group  ->  "fresh.{layer}"
  text K/V     "text_key.{layer}", "text_value.{layer}" of each cross-attention layer in the segment
The time embedding is its own graph: "timestep" [, "text_embeds", "time_ids"] -> "temb"; so are the text
keys and values, which depend on the text only and run once per generation: "text" -> "text_key.{layer}",
"text_value.{layer}" for every cross-attention layer.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.context import PatchContext
from ..core.layout import PatchLayout
from ..core.model import unet_downsampling_factor
from ..core.modes import Mode
from ..core.patch_layers import patch_unet
from .segments import (SegmentIO, SegmentModule, ShapeRecorder, TextKeyValueInputs, TextKeyValues, TimeEmbedding,
                       cross_attention_layers, partition, text_kv_names)

log = logging.getLogger("distrifusion.export")

OPSET = 17
EXPORT_FORMAT = 5  # bump when the graphs' contents or names change: it is part of the build cache key
EXTERNAL_DATA_ABOVE = 1_800_000_000  # bytes of weights; protobuf's hard limit is 2 GiB
ASYNC_STEP = 1 << 30  # any step past the warm-up


class _RecordingIO(SegmentIO):
    """SegmentIO that also notes which stale buffers a segment reads."""

    def __init__(self, stale):
        super().__init__(stale)
        self.read: list[str] = []

    def latest(self, key):
        if key not in self.read:
            self.read.append(key)
        return super().latest(key)


class _SegmentGraph(nn.Module):
    """Flat positional tensors in and out, for torch.onnx.export: activations, then every stale buffer's
    per-rank tensors, then each cross-attention layer's text key and value."""

    def __init__(self, module: SegmentModule, context: PatchContext, stale_keys, fresh_keys, size, text_layers):
        super().__init__()
        self.module, self.context = module, context
        self.stale_keys, self.fresh_keys, self.size, self.text_layers = stale_keys, fresh_keys, size, text_layers

    def forward(self, *args):
        n_act = len(self.module.segment.inputs)
        n_stale = len(self.stale_keys) * self.size
        tensors = dict(zip(self.module.segment.inputs, args[:n_act]))
        flat = list(args[n_act : n_act + n_stale])
        stale = {key: flat[i * self.size : (i + 1) * self.size] for i, key in enumerate(self.stale_keys)}
        text = args[n_act + n_stale :]
        supplied = {layer: (text[2 * i], text[2 * i + 1]) for i, layer in enumerate(self.text_layers)}
        io = SegmentIO(stale)
        self.context.exchange = io
        self.context.text_key_values = TextKeyValueInputs(supplied)
        outputs = self.module(tensors)
        return tuple(outputs.values()) + tuple(io.fresh[key] for key in self.fresh_keys)


@dataclass
class ExportSpec:
    height: int
    width: int
    batch: int  # UNet batch on this rank (2 x images without CFG split)
    units: tuple[int, ...]  # the patch group's layout
    index: int  # this rank's slab


def output_name(segment, name: str) -> str:
    """ONNX forbids a name on both sides of a graph: an activation passed through gets "_out"."""
    return f"{name}_out" if name in segment.inputs else name


def graph_mode(mode: Mode, patches: int) -> Mode:
    """The mode the exported graphs implement in the asynchronous steps they serve.

    With one slab nothing is borrowed, so every mode's graph is the corrected one (exact there).
    """
    if mode is Mode.FULL_SYNC:
        raise ValueError("full_sync runs every step synchronously in torch; engines serve only asynchronous "
                         "steps, so there is nothing to build")
    if mode is Mode.NAIVE_PATCH and patches > 1:
        raise ValueError("naive_patch is the quality report's baseline (seams included), run eagerly with "
                         "--engine torch; engines serve the displaced-patch modes")
    if mode is Mode.SYNC_GN and patches > 1:
        raise ValueError(
            "sync_gn needs a blocking GroupNorm exchange inside the UNet, which an engine cannot do; "
            "run it with --engine torch, or pick corrected_async_gn, stale_gn, separate_gn or no_sync"
        )
    return Mode.CORRECTED_ASYNC_GN if patches == 1 else mode


def example_inputs(pipe, spec: ExportSpec) -> tuple[dict, dict]:
    """Example tensors for the time embedding and for the segments (values do not matter), in the UNet's
    dtype: the graphs' inputs and outputs are in the engine precision. The timestep stays float32 (its
    sinusoidal projection is computed in float32, then cast, as diffusers does)."""
    unet = pipe.unet
    dtype = unet.dtype
    generator = torch.Generator().manual_seed(0)
    vae_scale = pipe.vae_scale_factor
    sample = torch.randn(spec.batch, unet.config.in_channels, spec.height // vae_scale, spec.width // vae_scale,
                         generator=generator).to(dtype)
    text_dim = unet.config.cross_attention_dim
    text = torch.randn(spec.batch, pipe.tokenizer.model_max_length, text_dim, generator=generator).to(dtype)
    embed = {"timestep": torch.full((spec.batch,), 500.0)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        embed["text_embeds"] = torch.randn(spec.batch, pooled, generator=generator).to(dtype)
        embed["time_ids"] = torch.tensor([[spec.height, spec.width, 0, 0, spec.height, spec.width]] * spec.batch,
                                         dtype=dtype)
    return embed, {"sample": sample, "text": text}


class SegmentExporter:
    """Patches a pipeline's UNet once and exports every rank's segments from it.

    Only the context's layout changes between ranks, so one set of weights serves them all.
    """

    def __init__(self, pipe, units: tuple[int, ...], mode: Mode, cut: str | None = None):
        self.pipe = pipe
        factor = unet_downsampling_factor(pipe.unet.config)
        self.mode = graph_mode(mode, len(units))
        self.context = PatchContext(PatchLayout(units, factor), ShapeRecorder(), self.mode, warmup_steps=1)
        patch_unet(pipe.unet, self.context)
        self.segments = partition(pipe.unet, cut)
        self.has_text_key_values = bool(cross_attention_layers(pipe.unet))

    @property
    def graphs_per_rank(self) -> int:
        """The time embedding, the segments and (with cross-attention) the text key/value graph."""
        return 1 + len(self.segments) + int(self.has_text_key_values)

    def export(self, spec: ExportSpec, out_dir: Path, progress=None) -> dict:
        """Exports the time embedding and every segment of slab ``spec.index``; returns its manifest."""
        out_dir.mkdir(parents=True, exist_ok=True)
        unet, context = self.pipe.unet, self.context
        layout = PatchLayout(spec.units, context.layout.unit_rows, spec.index)
        context.layout = layout
        embed_inputs, act_inputs = example_inputs(self.pipe, spec)
        manifest = {"units": list(spec.units), "index": spec.index, "batch": spec.batch, "height": spec.height,
                    "width": spec.width, "mode": self.mode.value, "segments": [], "buffers": {}}
        with torch.no_grad():
            embedding = TimeEmbedding(unet)
            temb = embedding(**embed_inputs)
            path = out_dir / "time_embedding.onnx"
            _export(embedding, tuple(embed_inputs.values()), path, list(embed_inputs), ["temb"])
            manifest["embed"] = {"file": path.name, "inputs": list(embed_inputs), "outputs": ["temb"]}
            if progress:
                progress("time_embedding")

            # A synchronous pass learns every layer's buffer shapes and each segment's example inputs.
            recorder = ShapeRecorder()
            context.exchange, context.step = recorder, 0
            tensors = {**act_inputs, "temb": temb}
            examples = []
            for segment in self.segments:
                examples.append({name: tensors[name] for name in segment.inputs})
                tensors.update(SegmentModule(unet, segment)(examples[-1]))

            context.step = ASYNC_STEP
            zeros = {k: [torch.zeros(s, dtype=recorder.dtypes[k]) for s in shapes]
                     for k, shapes in recorder.shapes.items()}
            every_text_layer = []
            for segment, example in zip(self.segments, examples):
                module = SegmentModule(unet, segment)
                io = _RecordingIO(zeros)  # a dry asynchronous run tells which buffers go in and out
                context.exchange = io
                text_reads = context.text_key_values = TextKeyValueInputs()
                module(example)
                stale_keys, fresh_keys, text_layers = list(io.read), list(io.fresh), list(text_reads.read)
                every_text_layer += text_layers
                graph = _SegmentGraph(module, context, stale_keys, fresh_keys, layout.num_patches, text_layers)
                args = (tuple(example[n] for n in segment.inputs) + tuple(t for k in stale_keys for t in zeros[k])
                        + tuple(t for pair in text_reads.read.values() for t in pair))  # the dry run's values
                input_names = list(segment.inputs) + [
                    f"stale.{k}.{r}" for k in stale_keys for r in range(layout.num_patches)
                ] + text_kv_names(text_layers)
                output_names = [output_name(segment, n) for n in segment.outputs] + [f"fresh.{k}" for k in fresh_keys]
                path = out_dir / f"segment_{segment.name.replace('+', '_')}.onnx"
                _export(graph, args, path, input_names, output_names)
                manifest["segments"].append({
                    "name": segment.name, "file": path.name, "inputs": list(segment.inputs),
                    "outputs": list(segment.outputs), "output_names": output_names[: len(segment.outputs)],
                    "stale": stale_keys, "fresh": fresh_keys, "text_kv": text_layers,
                })
                if progress:
                    progress(segment.name)
            context.text_key_values = None
            manifest["buffers"] = {k: [list(s) for s in shapes] for k, shapes in recorder.shapes.items()}
            manifest["text_kv"] = None
            if every_text_layer:
                path = out_dir / "text_key_values.onnx"
                _export(TextKeyValues(unet, every_text_layer), (act_inputs["text"],), path, ["text"],
                        text_kv_names(every_text_layer))
                manifest["text_kv"] = {"file": path.name, "layers": every_text_layer}
                if progress:
                    progress("text_key_values")
        return manifest


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str]) -> None:
    """torch.onnx.export into a scratch folder, then one clean file (plus ``<file>.data`` if large)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, str(raw), input_names=input_names, output_names=output_names,
                opset_version=OPSET, dynamo=False, do_constant_folding=True,
            )
        model = onnx.load(str(raw))  # pulls in any per-tensor files the exporter wrote beside it
        weights = sum(t.ByteSize() for t in model.graph.initializer)
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        if weights > EXTERNAL_DATA_ABOVE:
            # protobuf cannot hold more than 2 GB: the weights go to one file beside the graph.
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data.name, size_threshold=1024)
        else:
            onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
