"""Runs one rank's UNet step as a chain of segment engines, exchanging buffers between them.

Before a segment runs, the stale buffers it reads are taken from the exchange (waiting, if need be,
for the all-gather started when the same segment ran in the previous step); right after it runs,
its fresh buffers go out together in one async all-gather while the next segment computes.

Who holds a runner's outputs, and until when (a TensorRT runner returns the same output tensors from every
run, so each must be used up before its runner runs again, and every runner here runs once a step):
- a segment's fresh buffers: ``exchange.start`` queues them and ``flush()``, right after the segment,
  copies them into the collective's send buffer (``BufferExchange``). (A single slab publishes nothing,
  ``PatchContext.alone``; should an input ever lie in a runner's own outputs, the TensorRT runner copies
  it before it overwrites them);
- its activations and skip connections: read by later segments of the same step;
- the embedding's ``temb``: read by every segment of the same step;
- the last segment's ``noise``: returned; the denoising loop builds the full output from it within the
  same step (its concatenation copies it);
- the text key/value graph's outputs: the cross-attention layers' text keys and values, read by the
  segments of every step of the generation. That graph runs once per generation (and again only for
  other text), so its runner's outputs stay untouched until the cache they form is replaced.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .runners import make_runner
from .segments import text_kv_names

log = logging.getLogger("distrifusion.engine_unet")


class SegmentedUNet:
    """``cuda_graphs``: every runner replays its engine as a CUDA graph (TensorRT; ``engines/cuda_graph.py``);
    the exchange between segments runs as without graphs."""

    def __init__(self, rank_dir: Path, backend: str, cuda_graphs: bool = False):
        self.manifest = json.loads((rank_dir / "manifest.json").read_text())
        self.backend = backend
        suffix = ".onnx" if backend == "onnxruntime" else ".plan"
        self.embed = make_runner(backend, rank_dir / _with_suffix(self.manifest["embed"]["file"], suffix),
                                 cuda_graph=cuda_graphs)
        self.segments = [
            (spec, make_runner(backend, rank_dir / _with_suffix(spec["file"], suffix), cuda_graph=cuda_graphs))
            for spec in self.manifest["segments"]
        ]
        self.shapes = {k: [tuple(s) for s in v] for k, v in self.manifest["buffers"].items()}
        self.text_kv_inputs = [text_kv_names(spec.get("text_kv", ())) for spec, _ in self.segments]
        text_kv = self.manifest.get("text_kv")  # builds before export format 4 computed them in every segment
        self.text_kv = None if text_kv is None else make_runner(
            backend, rank_dir / _with_suffix(text_kv["file"], suffix), cuda_graph=False)  # runs once per generation
        self._text_kv_cache: tuple | None = None  # (text tensor identity, the graph's outputs)

    def begin_generation(self) -> None:
        """Forgets the text keys and values: a new generation computes them from its own text."""
        self._text_kv_cache = None

    def text_key_values(self, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every cross-attention layer's text keys and values ("text_key.{layer}", "text_value.{layer}"),
        computed at the first step of a generation (or when the text tensor changes) and reused after."""
        if self.text_kv is None:
            return {}
        identity = (text.data_ptr(), text._version, tuple(text.shape), text.dtype, text.device)
        if self._text_kv_cache is None or self._text_kv_cache[0] != identity:
            self._text_kv_cache = (identity, self.text_kv.run({"text": text}))
        return self._text_kv_cache[1]

    def __call__(self, sample: torch.Tensor, timestep, cond, exchange) -> torch.Tensor:
        batch = sample.shape[0]
        feeds = {"timestep": torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)}
        if cond.added_cond_kwargs is not None:
            feeds.update(cond.added_cond_kwargs)  # each runner casts to what its graph declares
        tensors = {"sample": sample, "text": cond.prompt_embeds, "temb": self.embed.run(feeds)["temb"]}
        text_kv = self.text_key_values(cond.prompt_embeds)
        for (spec, runner), text_kv_inputs in zip(self.segments, self.text_kv_inputs):
            feeds = {name: tensors[name] for name in spec["inputs"]}
            feeds.update({name: text_kv[name] for name in text_kv_inputs})
            for key in spec["stale"]:
                for r, tensor in enumerate(exchange.latest(key)):
                    feeds[f"stale.{key}.{r}"] = tensor
            outputs = runner.run(feeds)
            for key in spec["fresh"]:
                exchange.start(key, outputs[f"fresh.{key}"], self.shapes[key])
            exchange.flush()  # one collective carries all of this segment's fresh buffers
            tensors.update({name: outputs[graph_name] for name, graph_name in zip(spec["outputs"], spec["output_names"])})
        return tensors["noise"]


def _with_suffix(name: str, suffix: str) -> str:
    return str(Path(name).with_suffix(suffix))
