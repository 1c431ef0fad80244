"""Stream one generation from the served ``pipeline_stream`` model over gRPC: a line per step, the
previews saved as PNGs, then the image. Ctrl-C cancels the request (the server frees its ranks at the
next step).

    python clients/grpc_stream_client.py --url localhost:8001 --prompt "a red circle" --steps 20 \
        --preview-every 5 --previews previews/ --out image.png
"""

import argparse
import sys
import threading
from pathlib import Path

from python_backend.client.request import save_png
from python_backend.client.stream import StreamCancelled, generate_stream


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--preview-every", type=int)
    parser.add_argument("--previews", type=Path, help="folder for the preview PNGs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)

    def on_step(message):
        print(f"step {message.step}/{message.steps}: {message.seconds:.2f} s, "
              f"exchange wait {message.exchange_wait_seconds:.3f} s", flush=True)
        if message.preview is not None and args.previews:
            save_png(message.preview, args.previews / f"step_{message.step:03d}.png")

    stop = threading.Event()
    try:
        image = generate_stream(args.url, args.prompt, steps=args.steps, seed=args.seed,
                                preview_every=args.preview_every, on_step=on_step, stop=stop)
    except KeyboardInterrupt:  # on_step runs in this thread: leaving the call cancels the request
        print("cancelled", file=sys.stderr)
        return 130
    except StreamCancelled:
        return 130
    save_png(image, args.out)
    print(f"saved {args.out} ({image.shape[1]}x{image.shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
