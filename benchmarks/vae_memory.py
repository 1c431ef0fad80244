"""Patch-parallel VAE decoding with the real SDXL VAE architecture (random weights): peak activation
memory and decode time per rank, N = 1, 2, 4, 8, side by side in one run.

    python benchmarks/vae_memory.py [--sizes 1024] [--ranks 1 2 4 8] [--threads 1] [--engine onnxruntime]
    python benchmarks/vae_memory.py --sizes 4096 --ranks 8 --lone

Every N runs as a real gloo process group on this machine's CPU (all ranks at once). Per rank:
"activations" is the process's peak resident memory during the decode (Linux VmHWM, reset just before
it, after one small warm-up decode that pays the libraries' first-call costs, as a served rank group
warms up before it takes requests) minus its resident memory just before: the decoder's activations, the exchange buffers and the
gathered image, without the weights; the ranks run with MALLOC_MMAP_THRESHOLD_=65536, so that glibc
returns every freed large block at once and the peak resident size is the peak of live tensors, not of
malloc's retained heap (the VAE's float32 weights are also listed). Time is the decode's
wall time on that rank; with more ranks than cores they share the CPU, so time per rank here says
little about a GPU per rank, memory says what it would hold. Prints a table and one JSON line.

``--engine onnxruntime``: with N > 1 each rank first exports its decoder pieces (engines/vae_segments.py,
into a scratch folder, not timed) and decodes on them, as a served group with a build does; the warm-up
is then one decode at the measured size (the pieces have static shapes). N = 1 stays the eager
single-device decode, the reference every ratio is taken against.

``--lone``: where N ranks at once do not fit in this machine's memory, one rank (the middle one)
decodes its slab alone in this process, the other slabs' halo rows, moments and keys/values stood in by
its own (resized to their shapes): the same shapes, so the same memory and computation as in a real
group, but not the image. No ratio is printed where N = 1 is not in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from common import model_or_tiny  # noqa: F401  (puts the repository root on sys.path)

SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=False)


MMAP_THRESHOLD = "65536"
WARMUP_LATENT_ROWS = 16  # a 128x128 image: 2 latent rows per rank at N = 8


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (VmHWM)
        f.write("5")


def _sdxl_vae_and_latents(size: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE).eval()
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    return vae, sum(p.numel() * p.element_size() for p in vae.parameters()), latents


def _measure(decode, warmup: torch.Tensor, latents: torch.Tensor) -> dict:
    """Decodes ``warmup`` (libraries' first-call costs, as a served group warms up), then ``latents``,
    measuring the peak resident memory above what was resident before, and the time."""
    with torch.no_grad():
        decode(warmup)
    before = _status_kib("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    with torch.no_grad():
        image = decode(latents)
    seconds = time.perf_counter() - started
    return {"activations_bytes": (_status_kib("VmHWM") - before) * 1024, "seconds": seconds,
            "image_shape": list(image.shape)}


def _decode_job(ranks, size: int, engine: str, scratch: str) -> list[dict]:
    import torch.distributed as dist

    from python_backend.core.model import vae_decode
    from python_backend.core.patch_vae import ParallelVaeDecoder

    vae, weights, latents = _sdxl_vae_and_latents(size)
    warmup = torch.zeros(1, 4, WARMUP_LATENT_ROWS, WARMUP_LATENT_ROWS)
    if ranks.world_size > 1 and engine != "torch":
        from pathlib import Path

        from python_backend.engines.vae_segments import SegmentedVaeDecoder, export_decoder

        folder = Path(scratch) / f"{size}-{ranks.world_size}" / f"rank{ranks.rank}"
        export_decoder(vae, tuple(latents.shape), ranks.world_size, ranks.rank, 1, folder)
        pieces = SegmentedVaeDecoder(folder, engine, ranks.world_size)
        del vae  # a rank decoding on pieces holds no torch VAE
        decode = ParallelVaeDecoder(None, dist.group.WORLD, ranks.rank, ranks.world_size, engine=pieces).decode
        warmup = torch.zeros_like(latents)  # static shapes: the warm-up decode is a full one
        dist.barrier()
    elif ranks.world_size > 1:
        decode = ParallelVaeDecoder(vae, dist.group.WORLD, ranks.rank, ranks.world_size).decode
        dist.barrier()
    else:
        def decode(z):
            return vae_decode(vae, z)
    mine = {"rank": ranks.rank, "weights_bytes": weights, **_measure(decode, warmup, latents)}
    if ranks.world_size == 1:
        return [mine]
    everyone = [None] * ranks.world_size
    dist.all_gather_object(everyone, mine)
    return everyone


def _lone_job(ranks, size: int, world_size: int) -> list[dict]:
    from python_backend.core.exchange import LoneRankExchange
    from python_backend.core.patch_vae import ParallelVaeDecoder

    vae, weights, latents = _sdxl_vae_and_latents(size)
    index = world_size // 2
    decoder = ParallelVaeDecoder(vae, None, index, world_size, exchange=LoneRankExchange(index, world_size))
    warmup = torch.zeros(1, 4, WARMUP_LATENT_ROWS, WARMUP_LATENT_ROWS)
    return [{"rank": index, "alone": True, "weights_bytes": weights, **_measure(decoder.decode, warmup, latents)}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch",
                        help="what decodes the slabs with N > 1: the eager patched VAE or its ONNX Runtime pieces")
    parser.add_argument("--lone", action="store_true",
                        help="with N > 1, the middle rank decodes alone (the others' data stood in by its own)")
    args = parser.parse_args()
    if args.lone and args.engine != "torch":
        parser.error("--lone decodes eagerly (the pieces would be exported at the full size first)")

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # glibc reads it when a process starts: this one too (N = 1 and --lone decode here), not only the ranks
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])

    from python_backend.core.ranks import run_on_ranks

    results = []
    scratch = tempfile.mkdtemp(prefix="vae-pieces-")
    for size in args.sizes:
        single = None
        print(f"\nSDXL VAE decoder, {size}x{size} image, float32, {args.threads} thread(s) per rank, slabs "
              f"decoded by {args.engine} (N = 1: eager)")
        print(f"{'N':>3} {'max activations/rank':>21} {'x single':>9} {'target 1.3/N':>13} {'max decode s/rank':>18}")
        for n in args.ranks:
            if args.lone and n > 1:
                ranks = run_on_ranks(1, _lone_job, (size, n), "cpu", args.threads)
            else:
                ranks = run_on_ranks(n, _decode_job, (size, args.engine, scratch), "cpu", args.threads)
            peak = max(r["activations_bytes"] for r in ranks)
            seconds = max(r["seconds"] for r in ranks)
            single = peak if n == 1 else single
            ratio = f"{peak / single:.3f}" if single else "-"
            alone = "  (rank %d alone)" % ranks[0]["rank"] if ranks[0].get("alone") else ""
            print(f"{n:>3} {peak / 2**20:>17.0f} MiB {ratio:>9} {1.3 / n:>13.3f} {seconds:>18.1f}{alone}", flush=True)
            results.append({"size": size, "ranks": n, "engine": args.engine if n > 1 else "torch", "per_rank": ranks})
        print(f"weights per rank: {ranks[0]['weights_bytes'] / 2**20:.0f} MiB (float32)")
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
