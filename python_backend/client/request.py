"""What the HTTP and gRPC clients share: the request's tensors, the command line, the PNG.

The served ensemble ``pipeline`` takes one required input, ``prompt``, and optional ones; an input
that is not sent takes the server's configured default. Every input has shape [1]. It returns
``image``: uint8 [H, W, 3].
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..core.defaults import SCHEDULERS

MODEL = "pipeline"
OUTPUT = "image"
DEFAULT_TIMEOUT_S = 600.0  # CPU servers take seconds per image, the first request much longer

# input name -> (numpy dtype, Triton dtype)
INPUTS = {
    "prompt": (np.object_, "BYTES"),
    "negative_prompt": (np.object_, "BYTES"),
    "seed": (np.int64, "INT64"),
    "steps": (np.int64, "INT64"),
    "guidance_scale": (np.float32, "FP32"),
    "scheduler": (np.object_, "BYTES"),
    "height": (np.int64, "INT64"),
    "width": (np.int64, "INT64"),
}


def request_tensors(prompt, negative_prompt=None, seed=None, steps=None, guidance_scale=None,
                    scheduler=None, height=None, width=None) -> list[tuple[str, np.ndarray, str]]:
    """(name, array of shape [1], Triton dtype) for each option that is not None, prompt first."""
    if prompt is None:
        raise ValueError("prompt is required")
    values = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
              "guidance_scale": guidance_scale, "scheduler": scheduler, "height": height, "width": width}
    tensors = []
    for name, value in values.items():
        if value is None:
            continue
        dtype, triton_dtype = INPUTS[name]
        if dtype is np.object_:  # strings travel as UTF-8 bytes
            array = np.array([str(value).encode("utf-8")], dtype=np.object_)
        else:
            array = np.array([value], dtype=dtype)
        tensors.append((name, array, triton_dtype))
    return tensors


def check_image(image: np.ndarray | None) -> np.ndarray:
    if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = None if image is None else f"{image.dtype} {list(image.shape)}"
        raise ValueError(f"expected a uint8 [H, W, 3] image from the server, got {got}")
    return image


def save_png(image: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The request's flags, shared by the example clients and ``distrifusion client``."""
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, help="guidance scale")
    parser.add_argument("--scheduler", choices=SCHEDULERS)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--model", default=MODEL, help=f"served model name (default {MODEL})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for the image (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--out", required=True, type=Path, help="PNG path")


def request_options(args: argparse.Namespace) -> dict:
    """``generate``'s keyword arguments from the flags of :func:`add_request_arguments`."""
    return dict(negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
                guidance_scale=args.guidance, scheduler=args.scheduler, height=args.height, width=args.width,
                model=args.model, timeout=args.timeout)


def command_line(protocol: str, default_url: str, argv=None) -> int:
    """The ``main()`` of the example clients: parse flags, generate over ``protocol``, save the PNG."""
    from .infer import generate

    parser = argparse.ArgumentParser(description=f"Generate one image with the '{MODEL}' model over {protocol}.")
    parser.add_argument("--url", default=default_url, help=f"HOST:PORT of the server (default {default_url})")
    add_request_arguments(parser)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    image = generate(args.url, args.prompt, protocol=protocol, **request_options(args))
    seconds = time.perf_counter() - start
    save_png(image, args.out)
    print(f"saved {args.out} ({image.shape[1]}x{image.shape[0]}) in {seconds:.2f} s")
    return 0
