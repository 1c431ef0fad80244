#!/usr/bin/env bash
# Sets up, writes the embedded default model and generates one image on 2 ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
[ -f artifacts/tiny-sdxl/model_index.json ] || .venv/bin/distrifusion tiny-model artifacts/tiny-sdxl
.venv/bin/distrifusion generate --model artifacts/tiny-sdxl --prompt "a photo of an astronaut riding a horse" \
  --ranks 2 --steps 20 --seed 0 --out outputs/astronaut.png --latents-out outputs/astronaut.npy "$@"
