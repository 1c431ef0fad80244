"""Serving figures: latency through Triton against in-process generation, and perf_analyzer.

    python benchmarks/serving.py [--model DIR] [--size 512] [--steps 20] [--ranks 2] [--repeats 5]
                                 [--out docs/serving_figures.md]

Both sides do the same work on the same rank layout (N ranks, CFG split when N is even): encode the
prompt, denoise, decode with the VAE, produce a uint8 image. In-process: one warmed rank group
timing that sequence (what `distrifusion generate` does after loading). Through Triton: the HTTP
client's latency for the ensemble (text_encoder -> denoiser on N ranks, decoding patch-parallel when N > 1 -> postprocess).
Medians after one warm-up request each. Then perf_analyzer sweeps concurrency 1..2 against the server.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from python_backend.core.denoise import GenerationRequest, PatchParallelDenoiser

from python_backend.core.parallel import ParallelConfig
from python_backend.core.model import decode_latents, load_pipeline
from python_backend.core.ranks import run_on_ranks

from common import model_or_tiny  # also puts the repository root on sys.path


def _in_process_job(ranks, model, request, repeats):
    import torch

    pipe = load_pipeline(model, ranks.device, torch.float32)
    denoiser = PatchParallelDenoiser(pipe, ranks, ParallelConfig())
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        result = denoiser.generate(request)
        if ranks.rank == 0:
            decode_latents(pipe, result.latents)
        if i:
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/serving_figures.md"))
    args = parser.parse_args()

    from python_backend.client import generate
    from python_backend.serving.client_commands import read_perf_csv
    from python_backend.serving.repository import serve_repository
    from python_backend.serving.settings import ServingSettings

    work = Path(tempfile.mkdtemp())
    model = model_or_tiny(args.model)
    prompt = "a photo of an astronaut riding a horse"
    request = GenerationRequest(prompt, height=args.size, width=args.size, steps=args.steps, seed=0)
    local = run_on_ranks(args.ranks, _in_process_job, (str(model), request, args.repeats))
    print(f"in-process: median {statistics.median(local):.3f} s", flush=True)

    settings = ServingSettings(model_dir=str(Path(model).resolve()), ranks=args.ranks,
                               sizes=f"{args.size}x{args.size}", default_steps=args.steps,
                               default_height=args.size, default_width=args.size)
    with serve_repository(settings, work) as server:
        url = server.urls["http"]
        served = []
        for i in range(args.repeats + 1):
            started = time.perf_counter()
            generate(url, prompt, seed=0)
            if i:
                served.append(time.perf_counter() - started)
        print(f"through Triton: median {statistics.median(served):.3f} s", flush=True)
        csv = work / "perf.csv"
        subprocess.run([sys.executable, "-m", "python_backend.cli", "perf", "--url", url, "--concurrency", "1:2",
                        "--csv", str(csv), "--input-data", str(_perf_inputs(work, args.size, args.steps))],
                       check=True)
        perf = read_perf_csv(csv)

    ratio = statistics.median(served) / statistics.median(local)
    lines = [
        "# Serving figures",
        "",
        f"Embedded default model (tiny SDXL architecture), {args.size}x{args.size}, {args.steps} Euler steps, "
        f"guidance 5, {args.ranks} CPU rank processes (gloo; CFG split when even), `corrected_async_gn`, "
        "on this 2-core machine. Produced by:",
        "",
        "```",
        f"python benchmarks/serving.py --size {args.size} --steps {args.steps} --ranks {args.ranks} "
        f"--repeats {args.repeats}",
        "```",
        "",
        "| path | median latency (s) |",
        "|---|---|",
        f"| in-process (encode, denoise on {args.ranks} ranks, decode) | {statistics.median(local):.3f} |",
        f"| through Triton over HTTP (ensemble) | {statistics.median(served):.3f} |",
        "",
        f"Triton / in-process: **{ratio:.3f}** (target: at most 1.05).",
        "",
        "perf_analyzer (`distrifusion perf --concurrency 1:2`, count windows, prompts from "
        "`clients/perf_inputs.json` at this size):",
        "",
        "| concurrency | throughput (infer/s) | p50 latency (ms) | p99 latency (ms) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['concurrency']} | {r['throughput']:.3f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in perf]
    lines += ["", "The rank group serves one request at a time (requests queue in Triton), so concurrency 2 "
              "raises latency without raising throughput: the parallelism is inside each image.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


def _perf_inputs(work: Path, size: int, steps: int) -> Path:
    import json

    data = json.loads(Path("clients/perf_inputs.json").read_text())
    for entry in data["data"]:
        entry["height"], entry["width"], entry["steps"] = [size], [size], [steps]
    path = work / "perf_inputs.json"
    path.write_text(json.dumps(data))
    return path


if __name__ == "__main__":
    main()
