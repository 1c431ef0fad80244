"""Sparse computation: one rank's UNet time per step at N = 2, 4 and 8 against one device.

    python benchmarks/sparse_compute.py [--model DIR] [--height 1024 --width 1024] [--ranks 2 4 8]
                                        [--repeats 5] [--out docs/sparse_compute.md]

Measures the computation of a single rank, one thread, in one process: the rank's patched UNet runs
its slab with a loopback exchange (the other slabs' buffers are zeros of the right shapes, delivered
without a network), so neither communication nor the other ranks' processes competing for this
machine's two cores enter the figure. The baseline is diffusers' own unpatched UNet on the whole
latent. Target: at most 1.10 / N of the baseline.

Each N runs twice, side by side: as patched now (keys and values projected by one fused product,
cross-attention text keys and values computed once per generation) and as before that ("unfused":
two projections and a concatenation, text keys and values every step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from python_backend.core.context import PatchContext
from python_backend.core.exchange import BufferExchange
from python_backend.core.layout import PatchLayout
from python_backend.core.model import encode_prompt, load_pipeline
from python_backend.core.modes import Mode
from python_backend.core.patch_layers import CachedCrossAttentionProcessor, PatchSelfAttentionProcessor, patch_unet

from common import model_or_tiny  # also puts the repository root on sys.path


HAND_WRITTEN = "<!-- written by hand below this line; the benchmark keeps it -->"


class LoopbackExchange(BufferExchange):
    """Delivers zeros for every other slab instantly: computation only, no transport.

    The receive storage is allocated zeroed once and reused, so only this rank's own slot is written;
    zeroing the whole gather buffer every call (as this benchmark did until 2026-12-07) cost the rank a
    memory fill that a real transport does not add to its computation (a third of the N = 8 step)."""

    def _collect(self, output, send, async_op):
        output.view(self.size, -1)[self.index].copy_(send)
        return None

    _swap_with_neighbours = _collect  # halo rows: the neighbours' slots are zeros too


def unfuse(unet) -> None:
    """The patched UNet as it was before the step's compute was trimmed: separate key and value
    projections concatenated for the exchange, and the layer's own cross-attention processor."""
    for module in unet.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, PatchSelfAttentionProcessor):
            processor.fused = lambda attn, x: torch.cat([attn.to_k(x), attn.to_v(x)], dim=-1)
        elif isinstance(processor, CachedCrossAttentionProcessor):
            module.set_processor(processor.fallback)


WARM_CALLS = 3
"""Untimed calls first: the synchronous warm-up step, then two asynchronous steps, because the exchange
allocates each of its two alternating receive buffers on first use (once per process: later steps and
generations reuse them); the timed calls are the steady state."""


def time_steps(unet, inputs, repeats: int, before_each=None) -> float:
    """Median seconds of one UNet call (batch 2, guided) over ``repeats`` calls after ``WARM_CALLS``."""
    times = []
    for i in range(repeats + WARM_CALLS):
        if before_each is not None:
            before_each(i)
        started = time.perf_counter()
        with torch.no_grad():
            unet(*inputs[0], **inputs[1])
        if i >= WARM_CALLS:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/sparse_compute.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = model_or_tiny(args.model)
    pipe = load_pipeline(model, torch.device("cpu"))
    cond = encode_prompt(pipe, "a photo of an astronaut", None, 1, True, args.height, args.width)
    latent = torch.randn(2, pipe.unet.config.in_channels, args.height // 8, args.width // 8)
    inputs = ((latent, torch.tensor(500)),
              {"encoder_hidden_states": cond.prompt_embeds, "added_cond_kwargs": cond.added_cond_kwargs})
    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    state = pipe.unet.state_dict()

    baseline = time_steps(pipe.unet, inputs, args.repeats)
    print(f"N=1 diffusers UNet: {baseline * 1000:.1f} ms/step", flush=True)
    rows = [(1, "diffusers UNet, whole latent", baseline)]
    for n in [1] + args.ranks:
        for variant in ("unfused", "fused"):
            unet = type(pipe.unet).from_config(pipe.unet.config)
            unet.load_state_dict(state)
            unet.eval()
            index = n // 2  # a middle slab: it borrows halos from both neighbours
            layout = PatchLayout.split(args.height // 8, n, factor, index)
            context = PatchContext(layout, LoopbackExchange(None, index, n), Mode.CORRECTED_ASYNC_GN, warmup_steps=1)
            patch_unet(unet, context)
            if variant == "unfused":
                unfuse(unet)
            context.begin_generation()
            # step 0 is the synchronous warm-up that fills the buffers; the timed steps are asynchronous
            seconds = time_steps(unet, inputs, args.repeats, before_each=context.begin_step)
            what = f"patched UNet ({variant}), rank {index} of {n}, asynchronous step"
            rows.append((n, what, seconds))
            print(f"N={n} {variant} rank {index}: {seconds * 1000:.1f} ms/step = {seconds / baseline:.3f} of N=1 "
                  f"(target <= {1.10 / n:.3f})", flush=True)

    lines = [
        "# Sparse computation: one rank's UNet time per step",
        "",
        f"Embedded default model (tiny SDXL architecture), {args.height}x{args.width} (latent "
        f"{args.height // 8}x{args.width // 8}), batch 2 (guided, no CFG split), one thread, one process, "
        f"median of {args.repeats} calls, `corrected_async_gn` asynchronous steps. The other slabs' buffers are "
        "delivered by a loopback exchange (zeros, no network), so this is the rank's computation alone. "
        "Target: at most 1.10 / N of the single-device time. *fused*: the step as shipped (keys and values "
        "projected by one product, cross-attention text keys and values once per generation); *unfused*: "
        "as before that (two projections and a concatenation, text keys and values every step), measured "
        "side by side in the same run.",
        "",
        "Produced by:",
        "",
        "```",
        f"python benchmarks/sparse_compute.py --height {args.height} --width {args.width} "
        f"--ranks {' '.join(map(str, args.ranks))} --repeats {args.repeats}",
        "```",
        "",
        "| N | what runs | ms / step | ratio to N = 1 | target |",
        "|---|---|---|---|---|",
    ]
    for n, what, seconds in rows:
        target = f"<= {1.10 / n:.3f}" if n > 1 else "-"
        lines.append(f"| {n} | {what} | {seconds * 1000:.1f} | {seconds / baseline:.3f} | {target} |")
    lines.append("")
    kept = args.out.read_text().partition(HAND_WRITTEN)[2] if args.out.exists() else ""
    args.out.write_text("\n".join(lines) + "\n" + HAND_WRITTEN + (kept or "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
