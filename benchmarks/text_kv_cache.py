"""What computing the cross-attention text keys and values once per generation saves the segment engines.

    python benchmarks/text_kv_cache.py [--model DIR] [--size 512] [--ranks 1 2 4 8] [--repeats 7] [--threads 1]
                                       [--out docs/text_kv_cache.md]

Two figures, side by side in one run:

- **SDXL 1024², counted**: the real SDXL UNet built on PyTorch's ``meta`` device (no weights, see
  comm_volume.py), patched, one asynchronous step of rank 0's slab under ``torch.utils.flop_counter``:
  its FLOPs with the text keys and values computed in the step (engines before export format 4) and
  with them cached (the second step of a generation), per rank at N = 1, 2, 4, 8 (no CFG split, batch 2).
  The text keys and values do not shrink with N (every rank attends from its slab to the whole text), so
  their share grows with N.
- **Embedded model, measured**: rank 0's ONNX Runtime segment engines at ``--size``, one step with the
  text key/value graph run every step (as the engines computed them before) against the same step
  reading the generation's cached outputs, the two interleaved step by step (median of ``--repeats``).
  The exchange is a stand-in that hands every layer zero buffers: this is compute only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import model_or_trained, write_report_keeping_notes  # also puts the repository root on sys.path
from comm_volume import SDXL_UNET_CONFIG, CountingExchange, build_unet, layer_kinds, unet_inputs

from python_backend.core.context import PatchContext
from python_backend.core.layout import PatchLayout
from python_backend.core.model import Conditioning, load_pipeline, unet_downsampling_factor
from python_backend.core.modes import Mode
from python_backend.core.patch_layers import patch_unet
from python_backend.engines.export import ExportSpec, SegmentExporter
from python_backend.engines.segmented_unet import SegmentedUNet


def sdxl_flops(ranks: list[int], size: int) -> list[tuple[int, float, float]]:
    """(N, rank 0's step FLOPs with the text keys and values computed, the same with them cached)."""
    unet = build_unet()
    factor = 2 ** (len(SDXL_UNET_CONFIG["block_out_channels"]) - 1)
    latent = size // 8
    context = PatchContext(PatchLayout.split(latent, 1, factor), CountingExchange(0, 1, {}), Mode.CORRECTED_ASYNC_GN)
    patch_unet(unet, context)
    kinds = layer_kinds(unet)
    rows = []
    for n in ranks:
        context.layout = PatchLayout.split(latent, n, factor, index=0)
        context.exchange = CountingExchange(0, n, kinds)
        inputs = unet_inputs(2, latent, latent)
        context.begin_generation()
        context.begin_step(0)  # a synchronous step first: the asynchronous ones read what it published
        with torch.no_grad():
            unet(**inputs)
        context.generation += 1  # as if a new generation began: the cross-attention layers' cache is empty
        computed = _step_flops(unet, context, inputs, context.warmup_steps)
        cached = _step_flops(unet, context, inputs, context.warmup_steps + 1)
        rows.append((n, computed, cached))
    return rows


def _step_flops(unet, context, inputs, step: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    context.begin_step(step)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(**inputs)
    return float(counter.get_total_flops())


class ZeroBuffers:
    """The exchange as ``SegmentedUNet`` calls it, handing every layer zero buffers and sending nothing."""

    def __init__(self, shapes: dict[str, list[tuple[int, ...]]]):
        self.buffers = {key: [torch.zeros(s) for s in per_rank] for key, per_rank in shapes.items()}

    def latest(self, key):
        return self.buffers[key]

    def start(self, key, tensor, shapes):
        """Nothing travels."""

    def flush(self):
        """Nothing travels."""


def measured_steps(model: Path, ranks: list[int], size: int, repeats: int) -> list[tuple[int, float, float, float]]:
    """(N, step ms with the text keys and values recomputed every step, with them cached, the text key/value
    graph alone ms) for rank 0's ONNX Runtime engines."""
    pipe = load_pipeline(str(model), torch.device("cpu"), torch.float32)
    factor = unet_downsampling_factor(pipe.unet.config)
    latent = size // pipe.vae_scale_factor
    exporter = SegmentExporter(pipe, (1,), Mode.CORRECTED_ASYNC_GN)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, pipe.unet.config.in_channels, latent, latent, generator=generator)
    text = torch.randn(2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, generator=generator)
    pooled = pipe.unet.add_embedding.linear_1.in_features - 6 * pipe.unet.config.addition_time_embed_dim
    cond = Conditioning(text, {"text_embeds": torch.randn(2, pooled, generator=generator),
                               "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)})
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in ranks:
            units = PatchLayout.split(latent, n, factor).units
            folder = Path(scratch) / f"n{n}"
            print(f"exporting rank 0's engines at N = {n} ...", file=sys.stderr, flush=True)
            manifest = exporter.export(ExportSpec(size, size, 2, tuple(units), 0), folder)
            (folder / "manifest.json").write_text(json.dumps(manifest))
            unet = SegmentedUNet(folder, "onnxruntime")
            exchange = ZeroBuffers({k: [tuple(s) for s in v] for k, v in unet.manifest["buffers"].items()})
            times = {"every step": [], "once": [], "graph": []}
            unet(sample, 500.0, cond, exchange)  # the sessions' first runs
            for _ in range(repeats):
                for variant in ("every step", "once"):
                    if variant == "every step":
                        unet.begin_generation()  # forget them: the step computes them again
                    started = time.perf_counter()
                    unet(sample, 500.0, cond, exchange)
                    times[variant].append(time.perf_counter() - started)
                started = time.perf_counter()
                unet.text_kv.run({"text": text})
                times["graph"].append(time.perf_counter() - started)
            rows.append((n, *(1000 * statistics.median(times[k]) for k in ("every step", "once", "graph"))))
            print(f"N = {n}: {rows[-1][1]:.1f} ms -> {rows[-1][2]:.1f} ms per step", file=sys.stderr, flush=True)
    return rows


def report(flops, steps, args, model: Path) -> list[str]:
    command = "python benchmarks/text_kv_cache.py " + shlex.join(sys.argv[1:])
    lines = ["# Cross-attention text keys and values, once per generation", "",
             f"Made by `{command}` on {time.strftime('%Y-%m-%d')} ({torch.get_num_threads()} thread(s)).", "",
             f"## SDXL {args.sdxl_size}², counted (rank 0, batch 2, FLOPs per asynchronous step)", "",
             "| N | computed every step | cached | saved |", "|---|---|---|---|"]
    for n, every, once in flops:
        lines.append(f"| {n} | {every / 1e12:.2f} TFLOP | {once / 1e12:.2f} TFLOP | {100 * (1 - once / every):.1f} % |")
    lines += ["", f"## Embedded model ({model.name}) at {args.size}², ONNX Runtime, measured (rank 0, ms per step)", "",
              "| N | text K/V every step | once per generation | ratio | the text K/V graph alone |",
              "|---|---|---|---|---|"]
    for n, every, once, graph in steps:
        lines.append(f"| {n} | {every:.1f} | {once:.1f} | {once / every:.3f} | {graph:.1f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a diffusers SDXL folder (default: the trained embedded model)")
    parser.add_argument("--size", type=int, default=512, help="the embedded model's image size (default 512)")
    parser.add_argument("--sdxl-size", type=int, default=1024, help="the counted SDXL image size (default 1024)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (default 1)")
    parser.add_argument("--out", type=Path, help="write the tables there (keeping its hand-written notes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = model_or_trained(args.model)
    flops = sdxl_flops(args.ranks, args.sdxl_size)
    steps = measured_steps(model, args.ranks, args.size, args.repeats)
    lines = report(flops, steps, args, model)
    print("\n".join(lines))
    if args.out:
        write_report_keeping_notes(args.out, lines)


if __name__ == "__main__":
    main()
