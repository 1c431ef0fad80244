"""The ``distrifusion`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..core import defaults
from ..core.defaults import SCHEDULERS
from ..core.devices import DEVICE_KINDS, DTYPES
from ..core.modes import DEFAULT_MODE, DEFAULT_WARMUP_STEPS, Mode
from ..core.parallel import group_shape
from ..engines.loader import ENGINE_BACKENDS
from .parallel_option import add_parallel_arguments, resolve_parallel
from .recipes import RecipeError, apply_recipe

log = logging.getLogger("distrifusion")


class UsageError(Exception):
    """A bad command-line value; the message names the flag."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if getattr(args, "recipe", None) is not None:
            args = apply_recipe(parser, args, argv)
        return args.handler(args)
    except RecipeError as error:
        print(f"distrifusion {args.command}: error: --recipe: {error}", file=sys.stderr)
        return 2
    except UsageError as error:
        print(f"distrifusion {args.command}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrifusion", description="DistriFusion patch-parallel diffusion")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="write the embedded default model (the trained tiny SDXL-layout "
                                                  "pipeline: coloured shapes at 256x256), or one with random weights")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--random", action="store_true",
                      help="seeded random weights instead of the trained ones (for tests; any size)")
    tiny.add_argument("--seed", type=int, default=0, help="the random weights' seed (with --random)")
    tiny.add_argument("--family", choices=("sdxl", "sd15"), default="sdxl",
                      help="sd15: the SD 1.5 layout, random weights only")
    tiny.set_defaults(handler=_tiny_model)

    gen = commands.add_parser("generate", help="generate images patch-parallel over N ranks")
    gen.add_argument("--model", required=True, type=Path, help="a local diffusers SDXL or SD 1.x/2.x folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--height", type=int, default=defaults.DEFAULT_HEIGHT)
    gen.add_argument("--width", type=int, default=defaults.DEFAULT_WIDTH)
    gen.add_argument("--steps", type=int, default=defaults.DEFAULT_STEPS)
    gen.add_argument("--guidance", type=float, default=defaults.DEFAULT_GUIDANCE)
    gen.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.DEFAULT_SCHEDULER)
    gen.add_argument("--seed", type=int, default=defaults.DEFAULT_SEED)
    gen.add_argument("--ranks", type=int, default=1, help="number of ranks (local processes, one per device)")
    gen.add_argument("--mode", choices=[m.value for m in Mode], default=DEFAULT_MODE.value)
    gen.add_argument("--warmup-steps", type=int, default=None,
                     help=f"default {DEFAULT_WARMUP_STEPS}; with --parallel auto: chosen from --steps")
    gen.add_argument("--no-split-cfg", action="store_true", help="every rank runs both guidance halves")
    add_parallel_arguments(gen)
    _add_exchange_dtype(gen)
    _add_cuda_graphs(gen)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--device", choices=DEVICE_KINDS, default="auto")
    gen.add_argument("--dtype", choices=("auto", *DTYPES), default="auto")
    gen.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / ranks)")
    gen.add_argument("--engine", choices=ENGINE_BACKENDS, default="torch",
                     help="what runs the asynchronous steps: the eager core or segment engines (built and cached on demand)")
    gen.add_argument("--engine-dir", type=Path, default=None, help="engine cache folder (default build/out/engines)")
    gen.add_argument("--parallel-vae", action=argparse.BooleanOptionalAction, default=True,
                     help="with --ranks > 1, every rank decodes its latent slab (default); --no-parallel-vae: "
                          "rank 0 decodes the whole image")
    gen.add_argument("--out", required=True, type=Path, help="PNG path (several images get _0, _1, ... suffixes)")
    gen.add_argument("--latents-out", type=Path, default=None, help="save final latents as float32 .npy")
    gen.set_defaults(handler=_generate)

    bld = commands.add_parser("build", help="export per-rank UNet segments to ONNX (and TensorRT engines), cached")
    bld.add_argument("--recipe", type=Path, default=None,
                     help="a build recipe (TOML, e.g. build/tiny-cpu.toml); flags given here override its values")
    bld.add_argument("--model", type=Path, default=None, help="a local diffusers SDXL or SD 1.x/2.x folder")
    bld.add_argument("--height", type=int, default=defaults.DEFAULT_HEIGHT)
    bld.add_argument("--width", type=int, default=defaults.DEFAULT_WIDTH)
    bld.add_argument("--ranks", type=int, default=1)
    bld.add_argument("--backend", choices=ENGINE_BACKENDS, default="onnxruntime",
                     help="torch: no engines (the eager core serves every step)")
    bld.add_argument("--precision", choices=("fp16", "fp32"), default=None,
                     help="default: fp16 for tensorrt, fp32 for onnxruntime")
    bld.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="the served UNet's dtype on every rank (auto: float16 on CUDA, float32 on CPU)")
    bld.add_argument("--mode", choices=[m.value for m in Mode], default=DEFAULT_MODE.value)
    bld.add_argument("--no-split-cfg", action="store_true", help="every rank runs both guidance halves")
    bld.add_argument("--split-cfg", action="store_false", dest="no_split_cfg",
                     help="split the guidance halves over two rank groups (the default; overrides a recipe's "
                          "split_cfg = false)")
    add_parallel_arguments(bld)
    _add_exchange_dtype(bld)
    _add_cuda_graphs(bld)
    bld.add_argument("--parallel-vae", action=argparse.BooleanOptionalAction, default=True,
                     help="with --ranks > 1 the served rank group decodes the image, every rank its latent slab "
                          "(default); --no-parallel-vae: the vae_decoder model decodes it on one device")
    bld.add_argument("--guidance", type=float, default=defaults.DEFAULT_GUIDANCE,
                     help="> 1 builds for a guided (CFG) batch; also the served default guidance")
    bld.add_argument("--num-images", type=int, default=1)
    bld.add_argument("--cut", default=None, help='segment cut, e.g. "down0+down1,down2,mid,up0,up1+up2"')
    bld.add_argument("--out", type=Path, default=None, help="engine cache folder (default build/out/engines)")
    bld.add_argument("--force", action="store_true", help="rebuild even if the cache has this build")
    bld.add_argument("--repository", type=Path, default=None,
                     help="also fill a Triton model repository here, set up for this build")
    bld.add_argument("--warmup-steps", type=int, default=None,
                     help=f"default {DEFAULT_WARMUP_STEPS}; with --parallel auto: chosen from --steps")
    bld.add_argument("--steps", type=int, default=defaults.DEFAULT_STEPS, help="the served default number of steps")
    bld.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.DEFAULT_SCHEDULER,
                     help="the served default scheduler")
    bld.add_argument("--max-steps", type=int, default=defaults.MAX_STEPS,
                     help=f"the most steps a served request may ask for (default {defaults.MAX_STEPS})")
    bld.set_defaults(handler=_build)

    doc = commands.add_parser("doctor", help="check this host for the GPU path: driver, GPUs, torch CUDA, "
                                             "TensorRT, NCCL, Triton; exit 1 with what to change")
    doc.add_argument("--ranks", type=int, default=1, help="GPUs the deployment needs")
    doc.add_argument("--no-engines", action="store_true", help="the eager path only: TensorRT not required")
    doc.set_defaults(handler=_doctor)

    from ..serving.client_commands import add_client_commands
    from ..serving.server import add_serve_command

    add_serve_command(commands)
    add_client_commands(commands)
    parser.subcommand_parsers = {"build": bld}  # apply_recipe sets a recipe's values as its defaults
    return parser


def _doctor(args) -> int:
    from .doctor import doctor

    return doctor(args)


def _tiny_model(args) -> int:
    from ..embedded.tiny_model import write_tiny_sd15, write_tiny_sdxl, write_trained_sdxl

    if args.family == "sdxl" and not args.random:
        path = write_trained_sdxl(args.out_dir)
        print(f"wrote the trained tiny sdxl model (coloured shapes, 256x256) to {path}")
        return 0
    writer = write_tiny_sdxl if args.family == "sdxl" else write_tiny_sd15
    path = writer(args.out_dir, seed=args.seed)
    print(f"wrote the tiny {args.family} model with random weights (seed {args.seed}) to {path}")
    return 0


def _add_exchange_dtype(parser) -> None:
    from ..core.exchange_codec import ALLOWED_VALUES

    parser.add_argument("--exchange-dtype", choices=ALLOWED_VALUES, default="native",
                        help="how the asynchronous steps' stale buffers travel between ranks: native (as computed, "
                             "the default), a narrower float, int8 with per-channel scales, or +residual: only the "
                             "change since the last exchange, quantized with error feedback (docs/compressed_exchange.md)")


def _add_cuda_graphs(parser) -> None:
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="TensorRT engines only: each segment is captured once and replayed as a CUDA graph "
                             "(one launch instead of its kernels'; the exchange stays between segments)")


def _build_request(args, backend: str, precision: str | None):
    from ..engines.build import BuildRequest

    if precision is None:
        precision = "fp16" if backend == "tensorrt" else "fp32"
    return BuildRequest(
        model=str(args.model), height=args.height, width=args.width, ranks=args.ranks, backend=backend,
        precision=precision, mode=args.mode, split_cfg=not args.no_split_cfg, guided=args.guidance > 1,
        num_images=args.num_images, cut=getattr(args, "cut", None), parallel_vae=args.parallel_vae,
    )


def _build_engines(request, out, force=False, device=None):
    """``device``: where the ranks that run these engines are (generate knows; build does not), so a backend
    that cannot feed them is refused before any work."""
    from ..engines.build import DEFAULT_OUT, build
    from ..engines.export import graph_mode
    from ..engines.runners import EngineDeviceError

    patches, _ = request.patches_and_batch()
    try:
        graph_mode(Mode(request.mode), patches)
    except ValueError as error:
        raise UsageError(f"--mode: {error}") from None
    if device is None and request.backend == "tensorrt":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--backend/--engine tensorrt needs an NVIDIA GPU; this machine has none")
    try:
        return build(request, out or DEFAULT_OUT, force=force, device=device)
    except EngineDeviceError as error:
        raise UsageError(f"--engine {request.backend}: {error}") from None


def _build(args) -> int:
    if args.model is None:
        raise UsageError("--model is required (or `model` in the --recipe)")
    validate_generate_args(args)
    _print_parallel_explanation(args)
    folder = None
    if args.backend != "torch":
        folder = _build_engines(_build_request(args, args.backend, args.precision), args.out, args.force)
        print(f"engines ready at {folder}")
    if args.repository is not None:
        from ..serving.repository import fill_repository
        from ..serving.settings import ServingSettings

        settings = ServingSettings(
            model_dir=str(args.model.resolve()), ranks=args.ranks, mode=args.mode, warmup_steps=args.warmup_steps,
            split_cfg=not args.no_split_cfg, engine=args.backend, engine_dir=str(folder.resolve()) if folder else "",
            sizes=f"{args.height}x{args.width}", default_steps=args.steps, default_guidance=args.guidance,
            default_scheduler=args.scheduler, default_height=args.height, default_width=args.width,
            max_steps=args.max_steps, dtype=args.dtype, parallel_vae=args.parallel_vae,
            exchange_dtype=args.exchange_dtype, cuda_graphs=args.cuda_graphs,
        )
        print(f"model repository ready at {fill_repository(args.repository, settings)}")
    return 0


def _print_parallel_explanation(args) -> None:
    if getattr(args, "parallel_explanation", None):
        print(args.parallel_explanation)


def validate_generate_args(args):
    """Checks every flag before any process starts and resolves ``--parallel`` (its explanation, if
    any, in ``args.parallel_explanation``); returns the model's ``ModelInfo``."""
    from ..core.layout import LayoutError, PatchLayout
    from ..core.model import ModelFolderError, ModelInfo

    try:
        info = ModelInfo.read(args.model)
    except ModelFolderError as error:
        raise UsageError(f"--model: {error}") from None
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value < 8 or value % 8:
            raise UsageError(f"{flag} must be a positive multiple of 8, got {value}")
    unit = info.vae_scale * info.downsampling_factor
    if args.height % unit or args.width % unit:
        raise UsageError(
            f"--height and --width must be multiples of {unit} for this model "
            f"(VAE factor {info.vae_scale} x UNet downsampling {info.downsampling_factor}), "
            f"got {args.height}x{args.width}"
        )
    max_steps = getattr(args, "max_steps", defaults.MAX_STEPS)  # build's --max-steps; generate's fixed limit
    if max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {max_steps}")
    if not 1 <= args.steps <= max_steps:
        raise UsageError(f"--steps must be between 1 and {max_steps}, got {args.steps}")
    if args.ranks < 1:
        raise UsageError(f"--ranks must be >= 1, got {args.ranks}")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if (getattr(args, "warmup_steps", 0) or 0) < 0:  # None: not given
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.guidance < 0:
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    if getattr(args, "cuda_graphs", False):
        from ..engines.runners import EngineDeviceError, check_cuda_graphs

        try:
            check_cuda_graphs(args.engine if hasattr(args, "engine") else args.backend)
        except EngineDeviceError as error:
            raise UsageError(f"--cuda-graphs: {error}") from None
    try:
        args.parallel_explanation = resolve_parallel(args, info)
    except ValueError as error:
        raise UsageError(str(error)) from None
    shape = group_shape(args.ranks, args.guidance > 1, not args.no_split_cfg, args.num_images)
    try:
        PatchLayout.split(args.height // info.vae_scale, shape.patches, info.downsampling_factor)
    except LayoutError as error:
        limit = args.height // unit * (2 if shape.split else 1)
        raise UsageError(f"--ranks {args.ranks} is too many for --height {args.height} (at most {limit}): {error}") from None
    # The patch-parallel VAE needs one latent row per rank: implied by the check above, which gives every
    # slab at least one UNet unit (>= 2 latent rows) and every CFG half at least N/2 slabs.
    return info


def _generate(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from ..core.denoise import GenerationRequest
    from ..core.devices import resolve_device_kind
    from ..core.parallel import ParallelConfig
    from ..core.ranks import run_on_ranks
    from .generate_job import GenerationJob, run_generation_job

    validate_generate_args(args)
    _print_parallel_explanation(args)
    device_kind = resolve_device_kind(args.device)
    if device_kind == "cuda" and args.ranks > torch.cuda.device_count():
        raise UsageError(f"--ranks {args.ranks} needs {args.ranks} GPUs; {torch.cuda.device_count()} present")
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
        num_images=args.num_images,
    )
    parallel = ParallelConfig(mode=Mode(args.mode), warmup_steps=args.warmup_steps, split_cfg=not args.no_split_cfg,
                              exchange_dtype=args.exchange_dtype)
    engine_dir = None
    if args.engine != "torch" and parallel.mode is Mode.FULL_SYNC:
        log.info("full_sync: every step is synchronous and runs in torch; no engines are needed")
        args.engine = "torch"
    if args.engine != "torch":
        precision = {"float16": "fp16", "float32": "fp32"}.get(args.dtype)  # engines in the UNet's precision
        engine_dir = str(_build_engines(_build_request(args, args.engine, precision), args.engine_dir,
                                        device=device_kind))
    job = GenerationJob(model=str(args.model), runs=[(request, parallel)], dtype=args.dtype, engine=args.engine,
                        engine_dir=engine_dir, parallel_vae=args.parallel_vae,
                        cuda_graphs=args.cuda_graphs and args.engine != "torch")
    (output,) = run_on_ranks(args.ranks, run_generation_job, (job,), device_kind, args.threads)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    paths = [args.out] if len(output.images) == 1 else [
        args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}") for i in range(len(output.images))
    ]
    for path, image in zip(paths, output.images):
        Image.fromarray(image).save(path)
        print(f"saved {path}")
    if args.latents_out is not None:
        args.latents_out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.latents_out, output.latents.astype(np.float32))
        print(f"saved latents {args.latents_out} {tuple(output.latents.shape)}")
    per_step = sum(output.unet_seconds) / len(output.unet_seconds)
    print(f"rank 0 UNet time: {per_step * 1000:.1f} ms/step over {len(output.unet_seconds)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
