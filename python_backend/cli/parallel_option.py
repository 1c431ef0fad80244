"""``--parallel`` of ``distrifusion build`` and ``generate``: how the ranks are used.

Without it nothing changes (the CFG split wherever it applies, unless ``--no-split-cfg``).
``auto`` asks the cost model (``core.auto_parallel``) for the layout: it treats ``--ranks`` as the
GPUs available, may use fewer, picks the CFG split, patches or both, and the warm-up steps unless
``--warmup-steps`` (or the recipe's ``warmup_steps``) says; the explanation is returned for the
command to print. ``patches``, ``cfg`` and ``both`` state the layout and are refused where it cannot
be built.
"""

from __future__ import annotations

from ..core.auto_parallel import FIGURES, INTERCONNECTS, AutoParallelInputs, choose_parallel, interconnect_from_text
from ..core.defaults import DEFAULT_WARMUP_STEPS
from ..core.modes import Mode

PARALLEL_CHOICES = ("auto", "patches", "cfg", "both")


def add_parallel_arguments(parser) -> None:
    parser.add_argument(
        "--parallel", choices=PARALLEL_CHOICES, default=None,
        help="auto: a cost model picks CFG split, patches or both, how many of --ranks GPUs to use and the "
             "warm-up steps, and prints why (docs/parallel_auto.md); patches: no CFG split; cfg: the two "
             "guidance halves on --ranks 2; both: CFG split into two patch groups. Default: the CFG split "
             "wherever it applies, unless --no-split-cfg")
    parser.add_argument(
        "--interconnect", default=None,
        help=f"with --parallel auto: the link between GPUs, {' or '.join(INTERCONNECTS)} (default nvlink) or a "
             "bandwidth in GB/s")


class ParallelOptionError(ValueError):
    """A bad --parallel combination; the message names the flags."""


def resolve_parallel(args, info) -> str | None:
    """Sets ``args.ranks``, ``args.no_split_cfg`` and ``args.warmup_steps`` from ``--parallel``; returns
    the explanation to print for ``auto``, else None. ``info`` is the model folder's ``ModelInfo``."""
    choice = getattr(args, "parallel", None)
    if getattr(args, "interconnect", None) is not None and choice != "auto":
        raise ParallelOptionError("--interconnect applies only with --parallel auto")
    if choice == "auto":
        return _apply_auto(args, info)
    if choice is not None:
        _apply_stated_layout(args, choice)
    if args.warmup_steps is None:
        args.warmup_steps = DEFAULT_WARMUP_STEPS
    return None


def _apply_auto(args, info) -> str:
    text = args.interconnect if args.interconnect is not None else "nvlink"
    try:
        link = interconnect_from_text(text)
    except ValueError:
        raise ParallelOptionError(f"--interconnect must be {', '.join(INTERCONNECTS)} or a bandwidth in GB/s > 0, "
                                  f"got {text!r}") from None
    try:
        inputs = AutoParallelInputs(
            gpus=args.ranks, height=args.height, width=args.width, guided=args.guidance > 1,
            num_images=args.num_images, steps=args.steps, figures=FIGURES[info.family], interconnect=link,
            warmup_steps=args.warmup_steps, allow_cfg_split=not args.no_split_cfg,
            all_steps_synchronous=args.mode == Mode.FULL_SYNC.value,
            row_unit_px=info.vae_scale * info.downsampling_factor,
            exchange_dtype=getattr(args, "exchange_dtype", "native"),
        )
    except ValueError as error:
        raise ParallelOptionError(f"--parallel auto: {error}") from None
    choice = choose_parallel(inputs)
    args.ranks, args.no_split_cfg, args.warmup_steps = choice.ranks, not choice.split_cfg, choice.warmup_steps
    return choice.explain()


def _apply_stated_layout(args, choice: str) -> None:
    if choice == "patches":
        args.no_split_cfg = True
        return
    if args.guidance <= 1:
        raise ParallelOptionError(f"--parallel {choice} splits the guidance halves: it needs --guidance > 1, "
                                  f"got {args.guidance:g}")
    if args.no_split_cfg:
        raise ParallelOptionError(f"--parallel {choice} contradicts --no-split-cfg "
                                  "(or split_cfg = false in the recipe)")
    if choice == "cfg" and args.ranks != 2:
        raise ParallelOptionError(f"--parallel cfg runs one guidance half per GPU: it needs --ranks 2, got "
                                  f"{args.ranks} (--parallel both splits more GPUs into two patch groups)")
    if choice == "both" and (args.ranks < 4 or args.ranks % 2):
        raise ParallelOptionError(f"--parallel both needs an even --ranks >= 4 (two patch groups of at least 2), "
                                  f"got {args.ranks}")
