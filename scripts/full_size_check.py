"""Full-size check (not in CI): the real SDXL UNet architecture, random weights, 1024x1024, N = 2.

    python scripts/full_size_check.py [--out build/out/full-size] [--batch 1] [--index 0]

Builds diffusers' SDXL base UNet from its configuration with seeded random weights (no download),
exports slab ``--index`` of a 2-slab layout segment by segment to ONNX (weights as external data:
the graphs exceed protobuf's 2 GB), checks each graph, then runs one asynchronous step through ONNX
Runtime segment by segment, feeding zeros as the other slab's stale buffers. Prints what each phase
took, the sizes on disk and the peak resident memory. Needs ~20 GB RAM and ~15 GB disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import types
from pathlib import Path

import torch

SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/out/full-size"))
    parser.add_argument("--batch", type=int, default=1, help="UNet batch per rank (1: CFG split, 2: no split)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from diffusers import UNet2DConditionModel

    from python_backend.engines.export import ExportSpec, SegmentExporter
    from python_backend.core.modes import Mode
    from python_backend.engines.runners import OnnxRuntimeRunner
    from python_backend.engines.segments import text_kv_names

    report = {"size": args.size, "batch": args.batch, "index": args.index, "phases": {}}
    started = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SDXL_UNET).eval()
    params = sum(p.numel() for p in unet.parameters())
    report["phases"]["build random UNet"] = time.perf_counter() - started
    print(f"SDXL UNet: {params / 1e9:.2f} B parameters ({time.perf_counter() - started:.0f} s)", flush=True)

    pipe = types.SimpleNamespace(unet=unet, vae_scale_factor=8, tokenizer=types.SimpleNamespace(model_max_length=77))
    latent = args.size // 8
    units = (latent // 4 // 2, latent // 4 - latent // 4 // 2)
    exporter = SegmentExporter(pipe, units, Mode.CORRECTED_ASYNC_GN)
    spec = ExportSpec(args.size, args.size, args.batch, units, args.index)
    rank_dir = args.out / f"patch{args.index}"
    started = time.perf_counter()
    manifest = exporter.export(spec, rank_dir, progress=lambda name: print(
        f"  exported {name} ({time.perf_counter() - started:.0f} s, peak {peak_gib():.1f} GiB)", flush=True))
    (rank_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    report["phases"]["export + check"] = time.perf_counter() - started
    del exporter, unet, pipe

    sizes = {p.name: p.stat().st_size for p in rank_dir.iterdir()}
    report["disk_gib"] = sum(sizes.values()) / 2**30
    report["external_data_files"] = sorted(n for n in sizes if n.endswith(".data"))
    print(f"on disk: {report['disk_gib']:.1f} GiB; external data: {report['external_data_files']}", flush=True)

    # One asynchronous step through ONNX Runtime, one segment session at a time (memory).
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    batch = args.batch
    tensors = {"sample": torch.randn(batch, 4, latent, latent, generator=gen),
               "text": torch.randn(batch, 77, 2048, generator=gen)}
    embed = OnnxRuntimeRunner(rank_dir / manifest["embed"]["file"])
    tensors["temb"] = embed.run({"timestep": torch.full((batch,), 500.0),
                                 "text_embeds": torch.randn(batch, 1280, generator=gen),
                                 "time_ids": torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]] * batch,
                                                          dtype=torch.float32)})["temb"]
    text_kv = {}
    if manifest.get("text_kv"):  # the cross-attention layers' text keys and values, once per generation
        runner = OnnxRuntimeRunner(rank_dir / manifest["text_kv"]["file"])
        text_kv = runner.run({"text": tensors["text"]})
        del runner
    buffers = manifest["buffers"]
    for segment in manifest["segments"]:
        t0 = time.perf_counter()
        runner = OnnxRuntimeRunner(rank_dir / segment["file"])
        feeds = {name: tensors[name] for name in segment["inputs"]}
        feeds.update({name: text_kv[name] for name in text_kv_names(segment.get("text_kv", ()))})
        for key in segment["stale"]:
            for r, shape in enumerate(buffers[key]):
                feeds[f"stale.{key}.{r}"] = torch.zeros(shape)
        outputs = runner.run(feeds)
        del runner
        tensors.update({n: outputs[g] for n, g in zip(segment["outputs"], segment["output_names"])})
        print(f"  ran {segment['name']} in {time.perf_counter() - t0:.0f} s (peak {peak_gib():.1f} GiB)", flush=True)
    noise = tensors["noise"]
    report["phases"]["one ONNX Runtime step"] = time.perf_counter() - started
    report["noise_shape"] = list(noise.shape)
    report["noise_finite"] = bool(torch.isfinite(noise).all())
    report["peak_rss_gib"] = peak_gib()
    print(json.dumps(report, indent=1))
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
