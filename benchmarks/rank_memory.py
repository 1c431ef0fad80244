"""Memory per rank: what a served rank loads (the UNet only) against a rank that loads the whole pipeline.

    python benchmarks/rank_memory.py [--model DIR] [--dtype float16]

1. Measured on this machine: the resident memory of a fresh process after ``load_pipeline`` of
   ``--model`` (default: the tiny test model) on the CPU, UNet only (a served rank) and whole (the
   command line's ranks, which encode prompts and decode images themselves).
2. Computed for SDXL base: each component's weight bytes in ``--dtype``, from diffusers'/transformers'
   configurations instantiated on the meta device (no download, no memory). A served rank holds the
   UNet's; the text encoder and VAE models hold theirs once per deployment, not per rank. Engines
   (ONNX Runtime, TensorRT) hold another copy of the UNet's weights beside the eager UNet, which runs
   the synchronous warm-up steps. Activations and engine workspaces come on top: weights only here.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import torch

from common import model_or_tiny

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from full_size_check import SDXL_UNET  # noqa: E402  (the SDXL base UNet configuration)

SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SDXL_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")
SDXL_TEXT_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu")


def _resident_after_load(model: str, unet_only: bool, answer) -> None:
    from python_backend.core.model import load_pipeline

    torch.set_num_threads(1)
    load_pipeline(model, torch.device("cpu"), torch.float32, unet_only=unet_only)
    with open("/proc/self/status") as f:
        answer.send(int(next(line.split()[1] for line in f if line.startswith("VmRSS:"))) * 1024)


def measured(model: Path) -> dict[str, int]:
    context = multiprocessing.get_context("spawn")
    found = {}
    for name, unet_only in (("served rank (UNet only)", True), ("whole pipeline", False)):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_resident_after_load, args=(str(model), unet_only, send))
        process.start()
        found[name] = receive.recv()
        process.join()
    return found


def sdxl_weight_bytes(dtype: torch.dtype) -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        components = {
            "unet": UNet2DConditionModel.from_config(SDXL_UNET),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2)),
            "vae": AutoencoderKL.from_config(SDXL_VAE),
        }
    size = torch.tensor([], dtype=dtype).element_size()
    return {name: sum(p.numel() for p in module.parameters()) * size for name, module in components.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the tiny test model)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()
    mib, gib = 2**20, 2**30

    model = model_or_tiny(args.model)
    resident = measured(model)
    print(f"Measured, resident memory after loading {model.name} on the CPU in float32 (one process each):")
    for name, value in resident.items():
        print(f"  {name:<26} {value / mib:8.0f} MiB")

    weights = sdxl_weight_bytes(getattr(torch, args.dtype))
    print(f"\nSDXL base weights in {args.dtype} (configurations on the meta device):")
    for name, value in weights.items():
        print(f"  {name:<26} {value / gib:8.2f} GiB")
    unet = weights["unet"]
    print(f"  per served rank, eager UNet only:      {unet / gib:.2f} GiB")
    print(f"  per served rank, eager UNet + engines: {2 * unet / gib:.2f} GiB (the engines' copy of the weights)")
    print(f"  a rank that loads everything:          {sum(weights.values()) / gib:.2f} GiB")
    print(json.dumps({"resident_bytes": resident, "sdxl_weight_bytes": weights, "dtype": args.dtype}))


if __name__ == "__main__":
    main()
