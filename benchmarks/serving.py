"""Serving figures: latency through Triton against in-process generation, where the served time goes,
and perf_analyzer.

    python benchmarks/serving.py [--model DIR] [--size 512] [--steps 20] [--ranks 2] [--engine onnxruntime]
                                 [--repeats 5] [--runs 3] [--out docs/serving_figures.md]

Both sides do the same work on the same rank layout (N ranks, CFG split when N is even) and the same
engines (``--engine onnxruntime``: the build's UNet segments and, with N > 1, its decoder pieces, built
once here; ``torch``: the eager core): encode the prompt, denoise, decode patch-parallel (N > 1), make a
uint8 image. In-process: a warmed rank group timing that sequence, as ``distrifusion generate`` runs
it. Through Triton: the HTTP client's latency for the ``pipeline`` ensemble. Each of ``--runs`` runs
measures both sides (medians of ``--repeats`` after a warm-up request) and prints its ratio; the
server's per-model statistics (``/v2/models/<model>/stats``, the deltas over a run) say where the
served time goes. Then perf_analyzer sweeps concurrency 1..2 against the server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from python_backend.core.denoise import GenerationRequest
from python_backend.core.modes import Mode
from python_backend.core.parallel import ParallelConfig
from python_backend.core.ranks import run_on_ranks

from common import model_or_tiny  # also puts the repository root on sys.path

MODELS = ("text_encoder", "denoiser", "vae_decoder", "postprocess")


def _in_process_job(ranks, model, request, parallel, engine, engine_dir, repeats):
    """Per repeat: (total, encode, denoise, decode, to uint8) seconds on rank 0, after one warm-up."""
    import torch

    from python_backend.core.model import encode_prompt, to_uint8, vae_decode
    from python_backend.engines.loader import load_denoiser, load_parallel_decoder

    denoiser = load_denoiser(model, ranks, parallel, "float32", engine, engine_dir)
    pipe = denoiser.pipe
    decoder = load_parallel_decoder(model, ranks, engine, engine_dir, vae=pipe.vae) if ranks.world_size > 1 else None
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        with torch.no_grad():
            cond = encode_prompt(pipe, request.prompt, None, 1, request.guided, request.height, request.width)
        encoded = time.perf_counter()
        result = denoiser.generate(request, parallel, cond=cond)
        denoised = time.perf_counter()
        if decoder is not None:
            image = decoder.decode(result.latents, denoiser.factor)
        else:
            with torch.no_grad():
                image = vae_decode(pipe.vae, result.latents)
        decoded = time.perf_counter()
        if ranks.rank == 0:
            to_uint8(image)
        done = time.perf_counter()
        if i:
            times.append((done - started, encoded - started, denoised - encoded, decoded - denoised, done - decoded))
    return times


def _model_stats(http_url: str, model: str) -> dict | None:
    """Triton's cumulative inference statistics of ``model`` in seconds (None: not served)."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=30) as response:
            stats = json.loads(response.read())["model_stats"][0]["inference_stats"]
    except OSError:
        return None
    return {name: stats[name]["ns"] / 1e9 for name in ("success", "queue", "compute_input", "compute_infer",
                                                       "compute_output")} | {"count": stats["success"]["count"]}


def _stats_delta(before: dict, after: dict) -> dict:
    return {model: {k: after[model][k] - before[model][k] for k in after[model]}
            for model in after if after[model] is not None and before.get(model) is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--engine", choices=("torch", "onnxruntime"), default="onnxruntime")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/serving_figures.md"))
    args = parser.parse_args()

    from python_backend.client import generate
    from python_backend.core.defaults import DEFAULT_GUIDANCE, DEFAULT_MODE_NAME, DEFAULT_WARMUP_STEPS
    from python_backend.engines.build import BuildRequest, build
    from python_backend.serving.client_commands import read_perf_csv
    from python_backend.serving.repository import serve_repository
    from python_backend.serving.settings import ServingSettings

    work = Path(tempfile.mkdtemp())
    model = str(Path(model_or_tiny(args.model)).resolve())
    prompt = "a photo of an astronaut riding a horse"
    split = args.ranks % 2 == 0
    parallel = ParallelConfig(Mode(DEFAULT_MODE_NAME), DEFAULT_WARMUP_STEPS, split)
    request = GenerationRequest(prompt, height=args.size, width=args.size, steps=args.steps, seed=0,
                                guidance=DEFAULT_GUIDANCE)
    engine_dir = None
    if args.engine != "torch":
        engine_dir = str(build(BuildRequest(model, args.size, args.size, args.ranks, backend=args.engine,
                                            split_cfg=split, parallel_vae=args.ranks > 1), work / "engines"))
    settings = ServingSettings(model_dir=model, ranks=args.ranks, split_cfg=split, engine=args.engine,
                               engine_dir=engine_dir or "", sizes=f"{args.size}x{args.size}",
                               default_steps=args.steps, default_height=args.size, default_width=args.size)
    runs = []
    with serve_repository(settings, work / "serve") as server:
        url = server.urls["http"]
        for run in range(args.runs):
            local = run_on_ranks(args.ranks, _in_process_job,
                                 (model, request, parallel, args.engine, engine_dir, args.repeats))
            generate(url, prompt, seed=0)  # warm-up, not counted
            before = {m: _model_stats(url, m) for m in (*MODELS, "pipeline")}
            served = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                generate(url, prompt, seed=0)
                served.append(time.perf_counter() - started)
            after = {m: _model_stats(url, m) for m in (*MODELS, "pipeline")}
            runs.append({"local": local, "served": served, "stats": _stats_delta(before, after)})
            ratio = statistics.median(served) / statistics.median(t[0] for t in local)
            print(f"run {run + 1}: in-process {statistics.median(t[0] for t in local):.3f} s, through Triton "
                  f"{statistics.median(served):.3f} s: ratio {ratio:.3f}", flush=True)
        args.out.write_text(_report(args, runs, None))  # the runs are on record even if perf_analyzer fails
        csv = work / "perf.csv"
        done = subprocess.run([sys.executable, "-m", "python_backend.cli", "perf", "--url", url,
                               "--concurrency", "1:2", "--csv", str(csv),
                               "--input-data", str(_perf_inputs(work, args.size, args.steps))])
        perf = read_perf_csv(csv) if done.returncode == 0 else None
    args.out.write_text(_report(args, runs, perf))
    print(f"wrote {args.out}")


def _report(args, runs, perf) -> str:
    lines = [
        "# Serving figures",
        "",
        f"{'The tiny random-weight SDXL-layout model (`distrifusion tiny-model --random`)' if args.model is None else f'`{args.model}`'}, "
        f"{args.size}x{args.size}, {args.steps} Euler steps, "
        f"guidance 5, {args.ranks} CPU rank processes (gloo; CFG split when even), `corrected_async_gn`, "
        f"`{args.engine}` engines, on this 2-core machine. Produced by:",
        "",
        "```",
        f"python benchmarks/serving.py --size {args.size} --steps {args.steps} --ranks {args.ranks} "
        f"--engine {args.engine} --repeats {args.repeats} --runs {args.runs}",
        "```",
        "",
        "| run | in-process median (s) | through Triton over HTTP median (s) | Triton / in-process |",
        "|---|---|---|---|",
    ]
    for i, run in enumerate(runs, 1):
        local = statistics.median(t[0] for t in run["local"])
        served = statistics.median(run["served"])
        lines.append(f"| {i} | {local:.3f} | {served:.3f} | **{served / local:.3f}** |")
    lines += ["", "Target: at most 1.05 in every run.", "",
              "Where the time goes, per request (means over each run's requests; in-process on rank 0, "
              "served from Triton's per-model statistics):", "",
              "| run | side | text encoding | denoising | VAE decode | to uint8 | between models | client and HTTP |",
              "|---|---|---|---|---|---|---|---|"]
    for i, run in enumerate(runs, 1):
        local = [statistics.mean(t[k] for t in run["local"]) for k in range(5)]
        lines.append(f"| {i} | in-process | {local[1]:.3f} | {local[2]:.3f} | {local[3]:.3f} | {local[4]:.3f} | - | - |")
        stats = run["stats"]

        def per_request(model, keys=("queue", "compute_input", "compute_infer", "compute_output")):
            entry = stats.get(model)
            if not entry or not entry["count"]:
                return 0.0
            return sum(entry[k] for k in keys) / entry["count"]

        denoise = per_request("denoiser")
        decode = per_request("vae_decoder")
        models = per_request("text_encoder") + denoise + decode + per_request("postprocess")
        pipeline = per_request("pipeline", ("success",))
        client = statistics.mean(run["served"]) - pipeline
        where = "denoising + patch-parallel decode" if not stats.get("vae_decoder") else "denoising"
        lines.append(f"| {i} | Triton | {per_request('text_encoder'):.3f} | {denoise:.3f} ({where}) | "
                     f"{decode:.3f} | {per_request('postprocess'):.3f} | {pipeline - models:.3f} | {client:.3f} |")
    lines += ["", "Triton's time of a model is its queue wait plus compute (inputs, execution, outputs); "
              "\"between models\" is the ensemble's request time less its models' (the ensemble's own hand-offs); "
              "\"client and HTTP\" is the client's latency less the ensemble's request time.", "",
              "perf_analyzer (`distrifusion perf --concurrency 1:2`, count windows, prompts from "
              "`clients/perf_inputs.json` at this size):", "",
              "| concurrency | throughput (infer/s) | p50 latency (ms) | p99 latency (ms) |",
              "|---|---|---|---|"]
    if perf is None:
        lines.append("| - | perf_analyzer found no stable measurement (or did not run); see its output | | |")
    else:
        lines += [f"| {r['concurrency']} | {r['throughput']:.3f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
                  for r in perf]
    lines += ["", "The rank group serves one request at a time (requests queue in Triton), so concurrency 2 "
              "raises latency without raising throughput: the parallelism is inside each image.", ""]
    return "\n".join(lines)


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
