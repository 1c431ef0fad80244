#!/usr/bin/env python
"""Reproduce the embedded default model's trained weights from a seed (on CPU, about an hour on 2 cores).

    .venv/bin/python scripts/train_tiny_model.py OUT_DIR [--seed 0] [--unet-steps N] [--vae-steps N] ...
    .venv/bin/python scripts/train_tiny_model.py OUT_DIR --vae-from EARLIER_OUT/vae_stage   # UNet stage only

Writes a diffusers folder (loadable by StableDiffusionXLPipeline.from_pretrained) with
``training.json`` (configuration, losses, timings) and ``loss_curve.png``. The shipped weights in
``python_backend/embedded/trained_sdxl/`` were made by this script with its defaults; torch on another
CPU or thread count rounds differently, so a rerun matches them in quality, not bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python_backend.embedded.training import TrainingConfig, train_tiny_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    for f in dataclasses.fields(TrainingConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--vae-from", type=Path, help="the vae_stage folder of an earlier run with the same seed "
                        "and VAE settings: its VAE is used instead of training one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TrainingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig)})
    train_tiny_model(args.out, config, vae_from=args.vae_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
