"""What the gateway costs: pipeline latency through it and straight to tritonserver's own ports.

    python benchmarks/gateway.py [--model DIR] [--size 128] [--steps 2] [--ranks 2] [--repeats 15]

One served deployment; for each protocol, requests alternate between the gateway's port and
tritonserver's loopback port behind it (same prompt and seed: the images must be equal), so both
sides see the same machine load. Short generations (small size, few steps) make the per-request
overhead visible; it does not grow with the generation's length.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import model_or_tiny  # also puts the repository root on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    from python_backend.client import generate
    from python_backend.serving.repository import serve_repository
    from python_backend.serving.settings import ServingSettings

    model = model_or_tiny(args.model)
    settings = ServingSettings(model_dir=str(Path(model).resolve()), ranks=args.ranks, split_cfg=False,
                               sizes=f"{args.size}x{args.size}", default_steps=args.steps,
                               default_height=args.size, default_width=args.size)
    rows = []
    with serve_repository(settings, Path(tempfile.mkdtemp())) as server:
        ports = {"gateway": (server.http_port, server.grpc_port),
                 "tritonserver": (server.triton_http_port, server.triton_grpc_port)}
        for protocol, index in (("http", 0), ("grpc", 1)):
            times = {side: [] for side in ports}
            images = {}
            for i in range(args.repeats + 1):
                for side, pair in ports.items():
                    started = time.perf_counter()
                    images[side] = generate(f"127.0.0.1:{pair[index]}", "a red circle", protocol=protocol, seed=3)
                    if i:
                        times[side].append(time.perf_counter() - started)
            assert np.array_equal(images["gateway"], images["tritonserver"])
            through, direct = (statistics.median(times[side]) for side in ("gateway", "tritonserver"))
            rows.append((protocol, through, direct))
            print(f"{protocol}: gateway {through * 1000:.1f} ms, tritonserver directly {direct * 1000:.1f} ms, "
                  f"ratio {through / direct:.3f}", flush=True)
    print("\n| protocol | through the gateway (ms) | tritonserver directly (ms) | ratio | difference (ms) |")
    print("|---|---|---|---|---|")
    for protocol, through, direct in rows:
        print(f"| {protocol} | {through * 1000:.1f} | {direct * 1000:.1f} | {through / direct:.3f} | "
              f"{(through - direct) * 1000:+.1f} |")


if __name__ == "__main__":
    main()
