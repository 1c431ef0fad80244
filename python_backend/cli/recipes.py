"""Build recipes: one TOML file per deployment (``build/*.toml``) read by ``distrifusion build --recipe``.

A recipe holds the values of ``build``'s flags; a flag given on the command line wins over the
recipe, and the recipe wins over the built-in defaults. Unknown keys and values of the wrong type are
errors that name the key. Relative paths are taken from the current working directory.

    model = "artifacts/tiny-sdxl"      # a local diffusers folder
    height = 512
    width = 512
    ranks = 2
    backend = "onnxruntime"             # torch | onnxruntime | tensorrt
    precision = "fp32"                  # fp16 | fp32 (the engines)
    dtype = "auto"                      # the served UNet: auto | float32 | float16 | bfloat16
    mode = "corrected_async_gn"
    warmup_steps = 4
    split_cfg = true
    parallel = "auto"                   # optional: auto | patches | cfg | both (docs/parallel_auto.md); auto
                                        # keeps warmup_steps when given, chooses it otherwise
    interconnect = "nvlink"             # with parallel = "auto": nvlink | pcie | a bandwidth in GB/s
    exchange_dtype = "native"           # optional: how stale buffers travel (see --exchange-dtype)
    cuda_graphs = false                 # optional, tensorrt only: segments replay as CUDA graphs (served)
    parallel_vae = true                 # with ranks > 1 the rank group decodes the image (each rank its slab)
    cut = "down0+down1,down2,mid,up0,up1+up2"   # optional segment cut
    repository = "artifacts/repository"         # optional: fill a Triton model repository

    [served]                            # what a request gets when it does not say
    steps = 20
    guidance = 5.0
    scheduler = "euler"
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path


class RecipeError(ValueError):
    """A recipe that cannot be read; the message names the file and the key."""


# recipe key -> (argparse dest, type); [served] keys are prefixed "served."
KEYS = {
    "model": ("model", Path), "height": ("height", int), "width": ("width", int), "ranks": ("ranks", int),
    "backend": ("backend", str), "precision": ("precision", str), "dtype": ("dtype", str), "mode": ("mode", str),
    "warmup_steps": ("warmup_steps", int), "split_cfg": ("no_split_cfg", bool), "num_images": ("num_images", int),
    "parallel_vae": ("parallel_vae", bool), "parallel": ("parallel", str), "interconnect": ("interconnect", str),
    "exchange_dtype": ("exchange_dtype", str), "cuda_graphs": ("cuda_graphs", bool),
    "cut": ("cut", str), "out": ("out", Path), "repository": ("repository", Path),
    "served.steps": ("steps", int), "served.guidance": ("guidance", float), "served.scheduler": ("scheduler", str),
    "served.max_steps": ("max_steps", int),
}


def read_recipe(path: Path) -> dict:
    """argparse defaults (dest -> value) from the recipe at ``path``."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RecipeError(f"no recipe file at {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path} is not valid TOML: {error}") from None
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    values = {}
    for key, value in flat.items():
        if key not in KEYS:
            raise RecipeError(f"{path}: unknown key {key!r}; allowed: {', '.join(KEYS)}")
        dest, kind = KEYS[key]
        values[dest] = _typed(path, key, value, kind)
    if "no_split_cfg" in values:
        values["no_split_cfg"] = not values["no_split_cfg"]
    return values


def _typed(path, key, value, kind):
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {bool: "true or false", float: "a number", int: "an integer"}.get(kind, "a string")
        raise RecipeError(f"{path}: {key!r} must be {expected}, got {value!r}")
    return kind(value)


def apply_recipe(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """Parses ``argv`` again with the recipe's values as the build command's defaults."""
    build_parser = parser.subcommand_parsers[args.command]
    values = read_recipe(args.recipe)
    keys = {dest: key for key, (dest, _) in KEYS.items()}
    for action in build_parser._actions:  # argparse checks choices of flags, not of defaults
        if action.choices is not None and action.dest in values and values[action.dest] not in action.choices:
            raise RecipeError(f"{args.recipe}: {keys[action.dest]!r} is {values[action.dest]!r}; "
                              f"allowed: {', '.join(map(str, action.choices))}")
    build_parser.set_defaults(**values)
    return parser.parse_args(argv)
