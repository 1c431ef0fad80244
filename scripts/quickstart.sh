#!/usr/bin/env bash
# The main job on the embedded default model (trained on coloured shapes): set up, write the model, build its
# ONNX Runtime segment engines and decoder pieces and fill a Triton model repository for 2 CPU ranks, start
# the real tritonserver, generate one image through it over HTTP, save it, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
HTTP_PORT=${HTTP_PORT:-8000} GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002}
bin=.venv/bin
# Copied every time (11 MB): a checkout with newer weights replaces an older copy; the engine cache is keyed
# on the weights, so unchanged weights reuse their engines.
$bin/distrifusion tiny-model artifacts/shapes-sdxl
# build/tiny-cpu.toml names the model, size, ranks, backend and served defaults of this deployment.
$bin/distrifusion build --recipe build/tiny-cpu.toml
$bin/distrifusion serve --repository artifacts/repository --host 127.0.0.1 \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
$bin/python - "$HTTP_PORT" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready"
for _ in range(300):
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit("the server did not become ready in 300 s")
PY
$bin/distrifusion client --url "127.0.0.1:$HTTP_PORT" --protocol http \
  --prompt "a large red circle at the top left on a green background" --seed 0 --out outputs/quickstart.png "$@"
