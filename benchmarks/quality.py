"""Quality of every mode against one device: PSNR and max abs difference of the decoded images.

    python benchmarks/quality.py [--model DIR] [--height 384 --width 384 --steps 20] [--ranks 2 4]
                                 [--out docs/quality.md]

Without --model it writes the embedded default model to a temporary folder. Each N runs in one rank
group (real processes, gloo); every mode with the default warm-up (4 steps) and with none (which
behaves as 1 synchronous step, the least an asynchronous mode needs).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from python_backend.core.denoise import GenerationRequest

from python_backend.core.parallel import ParallelConfig
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.modes import Mode
from python_backend.core.ranks import run_on_ranks

from common import model_or_tiny  # also puts the repository root on sys.path


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--warmups", type=int, nargs="+", default=[4, 0])
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    parser.add_argument("--out", type=Path, default=Path("docs/quality.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = model_or_tiny(args.model)
    request = GenerationRequest(args.prompt, height=args.height, width=args.width, steps=args.steps,
                                guidance=5.0, scheduler="euler", seed=0)

    def run(world_size, configs):
        job = GenerationJob(str(model), [(request, c) for c in configs], decode=True, progress=False)
        started = time.perf_counter()
        outputs = run_on_ranks(world_size, run_generation_job, (job,))
        print(f"N={world_size}: {len(configs)} generations in {time.perf_counter() - started:.0f} s", flush=True)
        return outputs

    (reference,) = run(1, [ParallelConfig(Mode.FULL_SYNC)])
    rows = []
    for world_size in args.ranks:
        configs = [ParallelConfig(mode, warmup, split_cfg=False) for warmup in args.warmups for mode in Mode
                   if not (mode is Mode.FULL_SYNC and warmup != args.warmups[0])]
        for config, output in zip(configs, run(world_size, configs)):
            image, ref = output.images[0], reference.images[0]
            latent_error = np.linalg.norm(output.latents - reference.latents) / np.linalg.norm(reference.latents)
            rows.append((world_size, config.mode.value, config.warmup_steps, psnr(image, ref),
                         int(np.abs(image.astype(int) - ref.astype(int)).max()), latent_error))
            print(f"  N={world_size} {config.mode.value:20s} warm-up {config.warmup_steps}: "
                  f"PSNR {rows[-1][3]:.2f} dB, max |diff| {rows[-1][4]}, latent rel L2 {latent_error:.4f}",
                  flush=True)

    lines = [
        "# Quality of each mode against one device",
        "",
        f"Embedded default model (tiny SDXL architecture, seeded random weights), {args.height}x{args.width}, "
        f"{args.steps} Euler steps, guidance 5, seed 0, prompt \"{args.prompt}\". Every N runs all ranks "
        "as one patch group (no CFG split, so the patches are N slabs). Reference: N = 1 (which equals "
        "diffusers' pipeline to float32 rounding). PSNR and max |diff| on the decoded uint8 images; "
        "\"latent rel L2\" on the final latents.",
        "",
        "Produced by:",
        "",
        "```",
        f"python benchmarks/quality.py --height {args.height} --width {args.width} --steps {args.steps} "
        f"--ranks {' '.join(map(str, args.ranks))} --warmups {' '.join(map(str, args.warmups))}",
        "```",
        "",
        "Warm-up 0 behaves as 1 synchronous step: an asynchronous step needs a previous step to borrow from.",
        "",
        "| N | mode | warm-up steps | PSNR (dB) | max abs diff (0-255) | latent rel L2 |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | `{m}` | {w} | {p:.2f} | {d} | {e:.4f} |" for n, m, w, p, d, e in rows]
    lines += ["", "Caveat: random weights are not a trained model; the numbers compare the modes with each other "
              "on the same network, not the visual quality a trained SDXL would show.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
