"""Sparse computation: one rank's UNet time per step at N = 2, 4 and 8 against one device.

    python benchmarks/sparse_compute.py [--model DIR] [--height 1024 --width 1024] [--ranks 2 4 8]
                                        [--repeats 5] [--out docs/sparse_compute.md]
    python benchmarks/sparse_compute.py --sdxl [--ranks 8] [--repeats 1] [--out docs/sparse_compute_sdxl.md]

Measures the computation of a single rank, one thread, in one process: the rank's patched UNet runs
its slab with a loopback exchange (the other slabs' buffers are zeros of the right shapes, delivered
without a network), so neither communication nor the other ranks' processes competing for this
machine's two cores enter the figure. The baseline is diffusers' own unpatched UNet on the whole
latent. Target: at most 1.10 / N of the baseline.

Each N runs twice, side by side: as patched now (keys and values projected by one fused product,
cross-attention text keys and values computed once per generation) and as before that ("unfused":
two projections and a concatenation, text keys and values every step).

``--sdxl``: the real SDXL base UNet architecture (2.6 B parameters, seeded random weights, nothing
downloaded) instead of the embedded model, whose 32-64 channels make a step thousands of operations too
small to hide their per-call cost once the slab is an eighth. It needs ~14 GB of memory, and one
1024x1024 step of the whole latent takes minutes on one thread, so it measures the baseline and the
shipped step, on one copy of the weights patched in place after the baseline, side by side with the
same step concatenating the gathered keys and values and the halo frames into fresh tensors (as before
the context's workspace, core/workspace.py), the two taking turns call by call.
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

from common import model_or_tiny, write_report_keeping_notes  # also puts the repository root on sys.path


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


DOCS = Path(__file__).resolve().parent.parent / "docs"  # the default reports, wherever this runs from
WARM_CALLS = 3
"""Untimed calls first: the synchronous warm-up step, then two asynchronous steps, because the exchange
allocates each of its two alternating receive buffers on first use (once per process: later steps and
generations reuse them); the timed calls are the steady state."""
BASELINE_WARM_CALLS = 1  # the plain UNet has no exchange buffers to fill: one call warms the allocator


def time_steps(unet, inputs, repeats: int, before_each=None, warm_calls: int = WARM_CALLS) -> float:
    """Median seconds of one UNet call (batch 2, guided) over ``repeats`` calls after ``warm_calls``."""
    times = []
    for i in range(repeats + warm_calls):
        if before_each is not None:
            before_each(i)
        started = time.perf_counter()
        with torch.no_grad():
            unet(*inputs[0], **inputs[1])
        if i >= warm_calls:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_steps(unet, inputs, context: PatchContext, workspaces: dict, repeats: int) -> dict[str, float]:
    """Median seconds of one asynchronous step per workspace variant, the variants taking turns call by
    call (after ``WARM_CALLS`` of each), so that a drift of the machine's speed over the minutes a
    full-size run takes falls on both alike."""
    times = {name: [] for name in workspaces}
    step = 0
    with torch.no_grad():
        for turn in range(WARM_CALLS + repeats):
            for name, workspace in workspaces.items():
                context.workspace = workspace
                context.begin_step(step)
                step += 1
                started = time.perf_counter()
                unet(*inputs[0], **inputs[1])
                if turn >= WARM_CALLS:
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def sdxl_unet_and_inputs(height: int, width: int):
    """The SDXL base UNet (float32, seeded random weights: norms at identity, the rest N(0, 0.02)) and one
    guided step's inputs (batch 2, random text embeddings of SDXL's widths)."""
    from diffusers import UNet2DConditionModel

    from comm_volume import POOLED_DIM, SDXL_UNET_CONFIG, TEXT_TOKENS

    with torch.device("meta"):  # no time spent initialising weights that are overwritten below
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    unet = unet.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
            else:
                for parameter in module.parameters(recurse=False):
                    parameter.normal_(0.0, 0.02, generator=generator)
    latent = torch.randn(2, SDXL_UNET_CONFIG["in_channels"], height // 8, width // 8, generator=generator)
    text = torch.randn(2, TEXT_TOKENS, SDXL_UNET_CONFIG["cross_attention_dim"], generator=generator)
    added = {"text_embeds": torch.randn(2, POOLED_DIM, generator=generator),
             "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)}
    return unet, ((latent, torch.tensor(500)), {"encoder_hidden_states": text, "added_cond_kwargs": added})


def patched_in_place(unet, n: int, height: int, factor: int, unfused: bool = False) -> PatchContext:
    """Patches ``unet`` in place as the middle slab of ``n`` (it borrows halos from both neighbours)
    with a loopback exchange; returns the context, its generation begun."""
    index = n // 2
    layout = PatchLayout.split(height // 8, n, factor, index)
    context = PatchContext(layout, LoopbackExchange(None, index, n), Mode.CORRECTED_ASYNC_GN, warmup_steps=1)
    patch_unet(unet, context)
    if unfused:
        unfuse(unet)
    context.begin_generation()
    return context


def sdxl_rows(args) -> list[tuple[int, str, float]]:
    """The baseline and the shipped step per N on the SDXL architecture (one copy of the weights: the
    baseline first, then the same modules patched, their context's layout changed per N)."""
    torch.set_flush_denormal(True)  # random weights: keep subnormal arithmetic from skewing either side
    unet, inputs = sdxl_unet_and_inputs(args.height, args.width)
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    print("SDXL UNet built; timing the whole latent (minutes per call on one thread) ...", flush=True)
    baseline = time_steps(unet, inputs, args.repeats, warm_calls=BASELINE_WARM_CALLS)
    print(f"N=1 diffusers SDXL UNet: {baseline * 1000:.0f} ms/step", flush=True)
    rows = [(1, "diffusers SDXL UNet, whole latent", baseline)]
    context = None
    for n in args.ranks:
        index = n // 2
        if context is None:
            context = patched_in_place(unet, n, args.height, factor)
            workspace = context.workspace
        else:  # the same patched modules as another slab: the layers read the layout from the context
            context.layout = PatchLayout.split(args.height // 8, n, factor, index)
            context.exchange = LoopbackExchange(None, index, n)
            context.begin_generation()
        times = interleaved_steps(unet, inputs, context, {"shipped": workspace, "fresh concatenations": None},
                                  args.repeats)
        for what, seconds in times.items():
            rows.append((n, f"patched SDXL UNet ({what}), rank {index} of {n}, asynchronous step", seconds))
            print(f"N={n} {what} rank {index}: {seconds * 1000:.0f} ms/step = {seconds / baseline:.4f} of N=1 "
                  f"(target <= {1.10 / n:.4f})", flush=True)
        context.workspace = workspace
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sdxl", action="store_true",
                        help="the real SDXL UNet architecture with random weights (needs ~14 GB; minutes per step)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sdxl:
        out = args.out or DOCS / "sparse_compute_sdxl.md"
        write_sdxl_report(out, sdxl_rows(args), args)
        print(f"wrote {out}")
        return
    args.out = args.out or DOCS / "sparse_compute.md"

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
            context = patched_in_place(unet, n, args.height, factor, unfused=variant == "unfused")
            index = context.index
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
    ]
    write_report_keeping_notes(args.out, lines + table_lines(rows, ms_digits=1, ratio_digits=3))
    print(f"wrote {args.out}")


def write_sdxl_report(out: Path, rows, args) -> None:
    lines = [
        "# Sparse computation on the SDXL architecture: one rank's UNet time per step",
        "",
        f"The real SDXL base UNet configuration (2.6 B parameters, seeded random weights, float32), "
        f"{args.height}x{args.width} (latent {args.height // 8}x{args.width // 8}), batch 2 (guided, no CFG split), "
        f"one thread, one process, median of {args.repeats} call(s) after {BASELINE_WARM_CALLS} untimed one for "
        f"the baseline and {WARM_CALLS} for a patched step (the synchronous warm-up and the first use of the "
        "exchange's two receive buffers), `corrected_async_gn` asynchronous steps. *shipped*: the step as it "
        "runs (fused key and value projection, text keys and values once per generation, the gathered keys "
        "and values and the halo frames concatenated into the context's reused workspace); *fresh "
        "concatenations*: the same with a fresh tensor for every concatenation, as before the workspace; the two take turns call by call. The other slabs' buffers come from "
        "a loopback exchange (zeros, no network): this is the rank's computation alone. Target: at most "
        "1.10 / N of the single-device time.",
        "",
        "Produced by:",
        "",
        "```",
        f"python benchmarks/sparse_compute.py --sdxl --height {args.height} --width {args.width} "
        f"--ranks {' '.join(map(str, args.ranks))} --repeats {args.repeats}",
        "```",
        "",
    ]
    write_report_keeping_notes(out, lines + table_lines(rows, ms_digits=0, ratio_digits=4))


def table_lines(rows: list[tuple[int, str, float]], ms_digits: int, ratio_digits: int) -> list[str]:
    """The report's table: ``rows`` of (N, what runs, seconds), the first being the baseline."""
    baseline = rows[0][2]
    lines = ["| N | what runs | ms / step | ratio to N = 1 | target |", "|---|---|---|---|---|"]
    for n, what, seconds in rows:
        target = f"<= {1.10 / n:.{ratio_digits}f}" if n > 1 else "-"
        lines.append(f"| {n} | {what} | {seconds * 1000:.{ms_digits}f} | {seconds / baseline:.{ratio_digits}f} "
                     f"| {target} |")
    return lines + [""]


if __name__ == "__main__":
    main()
