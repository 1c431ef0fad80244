"""Stress run of the multi-rank jobs: the path of ``distrifusion generate --ranks N``, several rounds,
with busy processes hogging the cores beside them (how an abort at a rank's exit was once seen: rank 2
of 3 lost to SIGABRT, "terminate called without an active exception", in 1 of 5 runs under load).

    python benchmarks/rank_stress.py [--rounds 5] [--ranks 3] [--hogs 2] [--steps 4] [--size 128]

Every round runs the same requests (corrected asynchronous GroupNorm and stale, several steps) on
``--ranks`` CPU ranks; a round fails when a rank's process exits abnormally (a signal shows as a
negative code) or its latents differ from the first round's. Prints each round and a summary; exits 1
if any round failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from pathlib import Path

import numpy as np

from common import model_or_tiny


def _hog(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny test model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=2, help="busy processes beside the ranks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    from python_backend.cli.generate_job import GenerationJob, run_generation_job
    from python_backend.core.denoise import GenerationRequest
    from python_backend.core.modes import Mode
    from python_backend.core.parallel import ParallelConfig
    from python_backend.core.ranks import run_on_ranks

    model = model_or_tiny(args.model)
    request = GenerationRequest("a red circle at the top left on a blue background", height=args.size,
                                width=args.size, steps=args.steps, seed=3)
    runs = [(request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 1, split_cfg=False)),
            (request, ParallelConfig(Mode.STALE_GN, 1, split_cfg=False))]
    job = GenerationJob(str(model), runs, decode=False, progress=False)

    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    hogs = [context.Process(target=_hog, args=(stop,), daemon=True) for _ in range(args.hogs)]
    for hog in hogs:
        hog.start()
    failures, first = [], None
    try:
        for round_ in range(1, args.rounds + 1):
            started = time.monotonic()
            try:
                latents = [o.latents for o in run_on_ranks(args.ranks, run_generation_job, (job,))]
            except Exception as error:  # torch's ProcessExitedException names the rank and its exit code
                failures.append(f"round {round_}: {type(error).__name__}: {error}")
                print(f"round {round_}: FAILED after {time.monotonic() - started:.1f} s: {error}", flush=True)
                continue
            if first is None:
                first = latents
            same = all(np.array_equal(a, b) for a, b in zip(latents, first))
            if not same:
                failures.append(f"round {round_}: latents differ from round 1's")
            print(f"round {round_}: {args.ranks} ranks, {len(runs)} generations in {time.monotonic() - started:.1f} s "
                  f"beside {args.hogs} hog(s), {'same latents as round 1' if same else 'DIFFERENT latents'}",
                  flush=True)
    finally:
        stop.set()
        for hog in hogs:
            hog.join(5)
            if hog.is_alive():
                hog.kill()
    print(f"{args.rounds - len(failures)} of {args.rounds} rounds clean")
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
