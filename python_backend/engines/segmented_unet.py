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
  same step (its concatenation copies it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .runners import make_runner

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

    def __call__(self, sample: torch.Tensor, timestep, cond, exchange) -> torch.Tensor:
        batch = sample.shape[0]
        feeds = {"timestep": torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)}
        if cond.added_cond_kwargs is not None:
            feeds.update(cond.added_cond_kwargs)  # each runner casts to what its graph declares
        tensors = {"sample": sample, "text": cond.prompt_embeds, "temb": self.embed.run(feeds)["temb"]}
        for spec, runner in self.segments:
            feeds = {name: tensors[name] for name in spec["inputs"]}
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
