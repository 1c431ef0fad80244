"""Quality of every mode against one device, on the trained embedded model: the report in docs/quality.md.

    python benchmarks/quality.py [--model DIR] [--size 256] [--steps 20] [--ranks 2 4 8] [--captions 16]
                                 [--held-out 50] [--guidance 3] [--out docs/quality.md] [--grid docs/images/quality_grid.png]

Without --model it writes the embedded default model (the trained one) to a temporary folder. Prompts
are held-out captions (never trained on, ``training.held_out_specs``), generated as one batch per
configuration (each image its own caption, CFG guidance 3 by default, Euler, seed 0). Every N runs all ranks as
one patch group (no CFG split: the patches are N row slabs). Reference: N = 1.

1. N = 1 on ``--held-out`` captions: the caption checker's attribute accuracy (target >= 90 %).
2. For each N and mode (default warm-up, 4 steps) on the first ``--captions`` of them: PSNR of the
   decoded images and relative L2 of the final latents against N = 1, and the checker's accuracy.
3. Warm-up 0, 1, 2, 4 for corrected_async_gn at N = 4.
4. A picture grid: N = 1, then each mode at N = 4 and 8, with a magnified difference map under each.
"""

from __future__ import annotations

import argparse
import os
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from python_backend.core.denoise import GenerationRequest
from python_backend.core.modes import Mode
from python_backend.core.parallel import ParallelConfig
from python_backend.core.ranks import run_on_ranks

from common import add_guidance_argument, model_or_trained, write_report_keeping_notes  # also puts the repository root on sys.path

REPORT_MODES = [Mode.FULL_SYNC, Mode.SYNC_GN, Mode.CORRECTED_ASYNC_GN, Mode.STALE_GN, Mode.SEPARATE_GN,
                Mode.NO_SYNC, Mode.NAIVE_PATCH]
DIFF_GAIN = 8  # the difference maps' magnification


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _job(ranks, model, captions, request, configs):
    """Every config on one rank group; rank 0 returns (latents, images) per config."""
    import torch

    from python_backend.core.model import decode_latents, encode_prompt
    from python_backend.engines.loader import load_denoiser

    denoiser = load_denoiser(model, ranks, configs[0], "float32", "torch", None)
    with torch.no_grad():
        cond = encode_prompt(denoiser.pipe, list(captions), None, 1, request.guided, request.height, request.width)
    outputs = []
    for config in configs:
        result = denoiser.generate(replace(request, num_images=len(captions)), config, cond=cond)
        images = list(decode_latents(denoiser.pipe, result.latents)) if ranks.rank == 0 else []
        outputs.append((result.latents.float().cpu().numpy(), images))
    return outputs


def run(world_size, model, captions, request, configs):
    started = time.perf_counter()
    outputs = run_on_ranks(world_size, _job, (str(model), list(captions), request, list(configs)))
    print(f"N={world_size}: {len(configs)} batch(es) of {len(captions)} in {time.perf_counter() - started:.0f} s",
          flush=True)
    return outputs


def checker_accuracy(images, specs) -> tuple[float, dict[str, float]]:
    from python_backend.embedded.caption_checker import check, per_attribute_accuracy

    pairs = [(check(image), spec) for image, spec in zip(images, specs)]
    per = per_attribute_accuracy(pairs)
    return float(np.mean(list(per.values()))), per


def difference_map(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    diff = np.abs(image.astype(np.int32) - reference.astype(np.int32)).max(axis=2) * DIFF_GAIN
    return np.repeat(np.clip(diff, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def picture_grid(reference, columns, path: Path) -> None:
    """N = 1 on the left; each (label, image) column with its difference map below."""
    from PIL import Image, ImageDraw

    side = reference.shape[0]
    label_height = 28
    tiles = [("N=1", reference, None)] + [(label, image, difference_map(image, reference)) for label, image in columns]
    grid = Image.new("RGB", (side * len(tiles), 2 * side + label_height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (label, image, diff) in enumerate(tiles):
        grid.paste(Image.fromarray(image), (i * side, label_height))
        if diff is not None:
            grid.paste(Image.fromarray(diff), (i * side, label_height + side))
        draw.text((i * side + 4, 4), label, fill="black")
    draw.text((4, label_height + side + 4), f"difference x{DIFF_GAIN}", fill="black")
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--captions", type=int, default=16)
    add_guidance_argument(parser)
    parser.add_argument("--held-out", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("docs/quality.md"))
    parser.add_argument("--grid", type=Path, default=Path("docs/images/quality_grid.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from python_backend.embedded.training import held_out_specs

    model = model_or_trained(args.model)  # random weights would draw nothing for the checker
    specs = held_out_specs(max(args.held_out, args.captions))
    captions = [spec.caption() for spec in specs]
    request = GenerationRequest("", height=args.size, width=args.size, steps=args.steps, guidance=args.guidance,
                                scheduler="euler", seed=0)
    (held_out,) = run(1, model, captions[:args.held_out], request, [ParallelConfig(Mode.FULL_SYNC)])
    one_accuracy, one_per = checker_accuracy(held_out[1], specs[:args.held_out])
    print(f"N=1 on {args.held_out} held-out captions: {one_accuracy:.3f} {one_per}", flush=True)
    subset = captions[:args.captions]
    reference = (held_out[0][:args.captions], held_out[1][:args.captions])
    if args.held_out < args.captions:
        (reference,) = run(1, model, subset, request, [ParallelConfig(Mode.FULL_SYNC)])

    rows, grid_columns, warmup_rows = [], [], []
    for world_size in args.ranks:
        configs = [ParallelConfig(mode, 4, split_cfg=False) for mode in REPORT_MODES]
        if world_size == 4:
            configs += [ParallelConfig(Mode.CORRECTED_ASYNC_GN, w, split_cfg=False) for w in (0, 1, 2)]
        for config, (latents, images) in zip(configs, run(world_size, model, subset, request, configs)):
            latent_error = float(np.linalg.norm(latents - reference[0]) / np.linalg.norm(reference[0]))
            quality = float(np.mean([psnr(i, r) for i, r in zip(images, reference[1])]))
            accuracy, _ = checker_accuracy(images, specs[:args.captions])
            row = (world_size, config.mode.value, config.warmup_steps, quality, latent_error, accuracy)
            print(f"  N={world_size} {config.mode.value:20s} warm-up {config.warmup_steps}: PSNR {quality:.2f} dB, "
                  f"latent rel L2 {latent_error:.4f}, checker {accuracy:.3f}", flush=True)
            if config.warmup_steps == 4:
                rows.append(row)
                if world_size in (4, 8) and config.mode is not Mode.FULL_SYNC:
                    grid_columns.append((f"N={world_size} {config.mode.value}", images[0]))
            if world_size == 4 and config.mode is Mode.CORRECTED_ASYNC_GN:
                warmup_rows.append(row)
    picture_grid(reference[1][0], grid_columns, args.grid)
    write_report(args, captions, one_accuracy, one_per, rows, sorted(warmup_rows, key=lambda r: r[2]))
    print(f"wrote {args.out} and {args.grid}")


PAPER_ORDER = ("corrected_async_gn", "separate_gn", "stale_gn", "naive_patch")
"""The paper's ordering by quality: corrected >= separate >= stale > naive patches."""


def paper_ordering(rows) -> list[str]:
    """One line per N: whether the PSNRs (4 warm-up steps) follow :data:`PAPER_ORDER`, with the numbers."""
    lines = []
    for world_size in sorted({row[0] for row in rows}):
        psnr_of = {mode: quality for n, mode, warmup, quality, _, _ in rows if n == world_size and warmup == 4}
        if not all(mode in psnr_of for mode in PAPER_ORDER):
            continue
        values = [psnr_of[mode] for mode in PAPER_ORDER]
        holds = values[0] >= values[1] >= values[2] > values[3]
        chain = " / ".join(f"{mode} {psnr_of[mode]:.2f}" for mode in PAPER_ORDER)
        lines.append(f"- N = {world_size}: {'holds' if holds else 'does not hold'} ({chain} dB)")
    return lines


def write_report(args, captions, one_accuracy, one_per, rows, warmup_rows) -> None:
    table = lambda rs: [f"| {n} | `{m}` | {w} | {p:.2f} | {e:.4f} | {a:.1%} |" for n, m, w, p, e, a in rs]  # noqa: E731
    header = ["| N | mode | warm-up steps | PSNR vs N=1 (dB) | latent rel L2 | checker accuracy |",
              "|---|---|---|---|---|---|"]
    lines = [
        "# Quality of each mode against one device (trained embedded model)",
        "",
        f"The trained embedded model (tiny SDXL layout, `distrifusion tiny-model`), {args.size}x{args.size}, "
        f"{args.steps} Euler steps, guidance {args.guidance:g}, seed 0; prompts are held-out captions (never trained on), "
        "one image per caption, generated as one batch per configuration. Every N runs all ranks as one "
        "patch group (no CFG split: N row slabs). Reference: N = 1. PSNR on the decoded uint8 images "
        "(mean over the captions), relative L2 on the final latents, and the caption checker's attribute "
        "accuracy (shape, colour, position, size, background).",
        "",
        "Produced by:",
        "",
        "```",
        f"python benchmarks/quality.py --size {args.size} --steps {args.steps} --ranks {' '.join(map(str, args.ranks))} "
        f"--captions {args.captions} --held-out {args.held_out} --guidance {args.guidance:g}",
        "```",
        "",
        f"## One device on {args.held_out} held-out captions",
        "",
        f"Attribute accuracy: **{one_accuracy:.1%}** (target: at least 90 %); per attribute: "
        + ", ".join(f"{k} {v:.0%}" for k, v in one_per.items()) + ".",
        "",
        f"## Every mode at N = {', '.join(map(str, args.ranks))} ({args.captions} captions, 4 warm-up steps)",
        "",
        *header, *table(rows),
        "",
        "Does the paper's ordering (corrected >= separate >= stale > naive patches, by PSNR) hold on this model?",
        "",
        *paper_ordering(rows),
        "",
        "## Warm-up steps, corrected_async_gn at N = 4",
        "",
        "Warm-up 0 behaves as 1 synchronous step: an asynchronous step needs a previous step to borrow from.",
        "",
        *header, *table(warmup_rows),
        "",
        f"## Pictures ({captions[0]!r})",
        "",
        f"![N = 1, then every mode at N = 4 and 8, difference x{DIFF_GAIN} below]({os.path.relpath(args.grid, args.out.parent)})",
        "",
    ]
    write_report_keeping_notes(args.out, lines)


if __name__ == "__main__":
    main()
