"""``--parallel auto``: choose the layout (CFG split, patches, both, how many GPUs) and the warm-up steps
from a small cost model, and say why.

The model (docs/parallel_auto.md has the figures, their sources and what is assumed):

- One rank's computation per step = a fixed per-step overhead that no slab size shrinks (kernel
  launches, host work) + the rest of the one-GPU step, scaled by the rank's batch, by pixels (linear
  layers and convs grow with pixels, attention's token pairs with pixels squared) and by the largest
  slab's share of the rows times the sparse-computation overhead ``1 + overhead * (N - 1)`` fitted to
  docs/sparse_compute.md; plus a small bookkeeping cost per patch-aware layer when there are patches.
- What one rank receives per step (docs/communication.md): (N - 1)/N of all self-attention K/V of its
  batch, and (N - 1) x the conv halo rows it publishes (halos are all-gathered), as fp16; its time is
  bytes / interconnect bandwidth + one latency per patch-aware layer.
- A warm-up (synchronous) step waits for all of it; an asynchronous step hides it behind the step's
  computation, so only ``max(0, communication - computation)`` shows. The UNet output all-gather
  (tiny) is paid every step.
- A generation = warm-up steps + asynchronous steps; the layout with the lowest mean step time wins,
  except that the simplest layout (fewest GPUs, then fewest patches) within 3 % of it is preferred.

Pure Python: no torch, so it runs anywhere (``python -m python_backend.core.auto_parallel --help``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field, replace

from .defaults import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_WARMUP_STEPS, MAX_STEPS
from .parallel import group_shape, synchronous_steps

MIB = 2 ** 20
FP16_BYTES = 2
MAX_GPUS = 256
MAX_IMAGES = 64
SIMPLER_LAYOUT_TOLERANCE = 0.03  # a simpler layout this close to the fastest is preferred
# Per patch-aware layer per step (publishing, copies, launches); set against a published measurement
# (docs/parallel_auto.md, "A check").
PATCH_LAYER_OVERHEAD_MS = 0.06
WARMUP_SHARE_LIMIT = 5  # at most 1 step in 5 synchronous, so the warm-up does not eat the speedup

# docs/sparse_compute.md: one rank's UNet time at N patches / the unpatched one-device UNet.
SPARSE_COMPUTE_RATIOS = {2: 0.485, 4: 0.262}


def fit_sparse_overhead(ratios: dict[int, float]) -> float:
    """Least-squares ``o`` in ``ratio(N) = 1/N * (1 + o * (N - 1))`` over the measured ``ratios``
    (clipped at 0: a slab never computes for less than its share)."""
    numerator = sum((ratio - 1 / n) * (n - 1) / n for n, ratio in ratios.items())
    denominator = sum(((n - 1) / n) ** 2 for n in ratios)
    return max(0.0, numerator / denominator)


SPARSE_OVERHEAD = fit_sparse_overhead(SPARSE_COMPUTE_RATIOS)


def _check_range(name, value, low, high, integer=False, low_open=False, high_open=False):
    kind_ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if kind_ok and not isinstance(value, bool):
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not (below or above):
            return
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{name} must be {kind} in {left}{low:g}, {high:g}{right}, got {value!r}")


@dataclass(frozen=True)
class ModelFigures:
    """What the model needs to know about a UNet family. The byte figures are computed from the
    architecture (docs/communication.md for SDXL); the times are assumptions (docs/parallel_auto.md)."""

    family: str
    reference_height: int
    reference_width: int
    step_ms: float  # one UNet step, whole image, batch 2, one GPU, at the reference size
    fixed_ms: float  # of step_ms: per-step overhead that does not shrink with the slab or the batch
    attention_share: float  # of the rest: the share that grows with pixels squared (attention's token pairs)
    kv_mib_per_image: float  # all self-attention K and V of one batch element at the reference size
    halo_mib_per_image: float  # conv halo rows one rank publishes per step, one batch element, reference width
    layer_collectives: int  # patch-aware layers: one exchange each per step
    row_unit_px: int  # image rows per slab unit: VAE scale x UNet downsampling
    latent_channels: int = 4
    vae_scale: int = 8

    def __post_init__(self):
        _check_range("step_ms", self.step_ms, 0.0, math.inf, low_open=True)
        _check_range("fixed_ms", self.fixed_ms, 0.0, self.step_ms, high_open=True)
        _check_range("attention_share", self.attention_share, 0.0, 1.0)


FIGURES = {
    # SDXL at 1024x1024: K/V 400 MiB and halos 7.81 MiB per batch element (docs/communication.md,
    # 800 MiB and 15.62 MiB at batch 2), 155 patch-aware layers (39 convs, 70 attentions, 46 GroupNorms).
    "sdxl": ModelFigures(family="sdxl", reference_height=1024, reference_width=1024, step_ms=60.0, fixed_ms=8.0,
                         attention_share=0.15, kv_mib_per_image=400.0, halo_mib_per_image=7.8125,
                         layer_collectives=155, row_unit_px=32),
    # SD 1.x/2.x at 512x512: by the same rule from the SD 1.5 configuration (16 self-attentions, 51 halo
    # convs, 61 GroupNorms), not from the benchmark.
    "sd": ModelFigures(family="sd", reference_height=512, reference_width=512, step_ms=15.0, fixed_ms=5.0,
                       attention_share=0.30, kv_mib_per_image=44.0625, halo_mib_per_image=4.4141,
                       layer_collectives=128, row_unit_px=64),
}


@dataclass(frozen=True)
class Interconnect:
    name: str
    gbytes_per_s: float  # what one rank receives per second during an all-gather (10^9 bytes)
    latency_ms: float  # per collective

    def __post_init__(self):
        _check_range("interconnect bandwidth (GB/s)", self.gbytes_per_s, 0.0, math.inf, low_open=True)
        _check_range("interconnect latency (ms)", self.latency_ms, 0.0, math.inf)

    def transfer_ms(self, mib: float) -> float:
        return mib * MIB / (self.gbytes_per_s * 1e9) * 1000.0

    def describe(self) -> str:
        return f"{self.name} ({self.gbytes_per_s:g} GB/s, {self.latency_ms * 1000:g} us per collective)"


INTERCONNECTS = {
    "nvlink": Interconnect("nvlink", gbytes_per_s=150.0, latency_ms=0.02),  # NVLink/NVSwitch (A100, H100 SXM)
    "pcie": Interconnect("pcie", gbytes_per_s=16.0, latency_ms=0.05),  # PCIe without NVLink (through the host)
}
CUSTOM_LATENCY_MS = 0.03


def interconnect_from_text(text: str) -> Interconnect:
    """A preset name (nvlink, pcie) or a bandwidth in GB/s."""
    if text in INTERCONNECTS:
        return INTERCONNECTS[text]
    try:
        bandwidth = float(text)
    except ValueError:
        bandwidth = math.nan
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"interconnect must be one of {', '.join(INTERCONNECTS)} or a bandwidth in GB/s > 0, "
                         f"got {text!r}")
    return Interconnect(f"{bandwidth:g} GB/s link", bandwidth, CUSTOM_LATENCY_MS)


WIRE_FRACTION = {"native": 1.0, "float16": 1.0, "bfloat16": 1.0, "int8": 0.5, "int4": 0.25}
"""Bytes on the wire per byte of an fp16 activation, by ``--exchange-dtype`` format (core/exchange_codec.py;
the per-channel scales are under 0.1 % at SDXL sizes): what the asynchronous steps send. Warm-up steps
are exact."""


def wire_fraction(exchange_dtype: str) -> float:
    fmt = exchange_dtype.strip().lower().partition("+")[0]
    if fmt not in WIRE_FRACTION:
        raise ValueError(f"exchange_dtype must be one of {', '.join(WIRE_FRACTION)} (optionally +residual), "
                         f"got {exchange_dtype!r}")
    return WIRE_FRACTION[fmt]


@dataclass(frozen=True)
class AutoParallelInputs:
    gpus: int  # available; the choice may use fewer
    height: int
    width: int
    guided: bool  # classifier-free guidance (guidance > 1): a batch of two halves
    num_images: int = 1
    steps: int = DEFAULT_STEPS
    figures: ModelFigures = FIGURES["sdxl"]
    interconnect: Interconnect = INTERCONNECTS["nvlink"]
    warmup_steps: int | None = None  # None: chosen here
    allow_cfg_split: bool = True  # False: --no-split-cfg, patches only
    all_steps_synchronous: bool = False  # mode full_sync: nothing hides behind computation
    row_unit_px: int | None = None  # the model's slab unit in image rows; None: the figures'
    exchange_dtype: str = "native"  # how the asynchronous steps' buffers travel (--exchange-dtype)

    def __post_init__(self):
        wire_fraction(self.exchange_dtype)
        _check_range("gpus", self.gpus, 1, MAX_GPUS, integer=True)
        unit = self.slab_unit_px
        _check_range("row_unit_px", unit, 8, math.inf, integer=True)
        if not isinstance(self.height, int) or self.height < unit or self.height % unit:
            raise ValueError(f"height must be a positive multiple of {unit} (the model's slab unit), got {self.height}")
        if not isinstance(self.width, int) or self.width < 8 or self.width % 8:
            raise ValueError(f"width must be a positive multiple of 8, got {self.width}")
        _check_range("num_images", self.num_images, 1, MAX_IMAGES, integer=True)
        _check_range("steps", self.steps, 1, MAX_STEPS, integer=True)
        if self.warmup_steps is not None:
            _check_range("warmup_steps", self.warmup_steps, 0, MAX_STEPS, integer=True)

    @property
    def slab_unit_px(self) -> int:
        return self.row_unit_px if self.row_unit_px is not None else self.figures.row_unit_px

    @property
    def slab_units(self) -> int:
        return self.height // self.slab_unit_px

    @property
    def pixel_scale(self) -> float:
        figures = self.figures
        return self.height * self.width / (figures.reference_height * figures.reference_width)


@dataclass(frozen=True)
class LayoutEstimate:
    """One candidate layout and what the model estimates for it."""

    ranks: int
    split_cfg: bool
    patches: int
    batch_per_rank: int
    compute_ms: float  # one rank, one step
    received_mib: float  # one rank, one step, the layers' exchange
    comm_ms: float  # the layers' exchange: bytes / bandwidth + latencies
    gather_ms: float  # the UNet output all-gather, every step
    sync_step_ms: float  # a warm-up step: waits for the exchange
    async_step_ms: float  # an asynchronous step: the exchange hides behind computation
    exposed_ms: float  # of the exchange, what an asynchronous step still waits for
    synchronous_steps: int
    mean_step_ms: float

    def describe(self) -> str:
        if self.ranks == 1:
            return "one GPU"
        if self.split_cfg and self.patches == 1:
            return "CFG split only on 2 GPUs"
        if self.split_cfg:
            return f"CFG split + {self.patches} patches per guidance half on {self.ranks} GPUs"
        return f"{self.patches} patches on {self.ranks} GPUs"

    @property
    def kind(self) -> str:
        if self.ranks == 1:
            return "one GPU"
        if self.split_cfg:
            return "CFG split only" if self.patches == 1 else "CFG split + patches"
        return "patches only"


@dataclass(frozen=True)
class ParallelChoice:
    split_cfg: bool
    ranks: int
    patches: int
    warmup_steps: int
    estimated_step_ms: float
    table: tuple[LayoutEstimate, ...]
    reasons: tuple[str, ...] = field(default=())

    @property
    def chosen(self) -> LayoutEstimate:
        return next(e for e in self.table if (e.ranks, e.split_cfg) == (self.ranks, self.split_cfg))

    def explain(self) -> str:
        return "\n".join((*self.reasons, "", format_table(self.table, self.chosen)))


# --- the model -------------------------------------------------------------------------------------


def slab_compute_ratio(patches: int, slab_units: int) -> float:
    """One rank's share of the whole image's computation: its slab (the largest one, which the others
    wait for) times the overhead of computing a slab rather than the whole (docs/sparse_compute.md)."""
    if patches == 1:
        return 1.0
    largest_share = math.ceil(slab_units / patches) / slab_units
    return largest_share * (1 + SPARSE_OVERHEAD * (patches - 1))


def scalable_step_ms(inputs: AutoParallelInputs, batch: int) -> float:
    """The whole image's step without the fixed overhead, at ``batch`` on one GPU."""
    figures, scale = inputs.figures, inputs.pixel_scale
    pixel_factor = (1 - figures.attention_share) * scale + figures.attention_share * scale ** 2
    return (figures.step_ms - figures.fixed_ms) * batch / 2 * pixel_factor


def rank_compute_ms(inputs: AutoParallelInputs, patches: int, batch: int) -> float:
    bookkeeping = PATCH_LAYER_OVERHEAD_MS * inputs.figures.layer_collectives if patches > 1 else 0.0
    ratio = slab_compute_ratio(patches, inputs.slab_units)
    return inputs.figures.fixed_ms + scalable_step_ms(inputs, batch) * ratio + bookkeeping


def received_mib(inputs: AutoParallelInputs, patches: int, batch: int) -> float:
    """What a middle rank receives per step from its patch group: (N-1)/N of the K/V, and its halos from
    its (at most two) neighbours; halo rows go point to point (core/exchange.py)."""
    if patches == 1:
        return 0.0
    figures = inputs.figures
    kv_mib = figures.kv_mib_per_image * batch * inputs.pixel_scale
    halo_mib = figures.halo_mib_per_image * batch * inputs.width / figures.reference_width
    return kv_mib * (patches - 1) / patches + halo_mib * min(2, patches - 1)


def output_gather_ms(inputs: AutoParallelInputs, ranks: int) -> float:
    if ranks == 1:
        return 0.0
    figures = inputs.figures
    images = inputs.num_images * (2 if inputs.guided else 1)
    latent_pixels = (inputs.height // figures.vae_scale) * (inputs.width // figures.vae_scale)
    total_mib = images * figures.latent_channels * latent_pixels * FP16_BYTES / MIB
    link = inputs.interconnect
    return link.transfer_ms(total_mib * (ranks - 1) / ranks) + link.latency_ms


def estimate_layout(inputs: AutoParallelInputs, ranks: int, split_cfg: bool, warmup_steps: int) -> LayoutEstimate:
    shape = group_shape(ranks, inputs.guided, split_cfg, inputs.num_images)
    compute = rank_compute_ms(inputs, shape.patches, shape.batch)
    mib = received_mib(inputs, shape.patches, shape.batch)
    link = inputs.interconnect
    latencies = link.latency_ms * inputs.figures.layer_collectives
    comm = link.transfer_ms(mib) + latencies if shape.patches > 1 else 0.0  # warm-up steps: exact
    async_comm = link.transfer_ms(mib * wire_fraction(inputs.exchange_dtype)) + latencies if shape.patches > 1 else 0.0
    gather = output_gather_ms(inputs, ranks)
    exposed = max(0.0, async_comm - compute)
    sync_step = compute + comm + gather
    async_step = compute + exposed + gather
    if shape.patches == 1:
        sync_count = 0  # nothing is exchanged between slabs: every step is the same
    elif inputs.all_steps_synchronous:
        sync_count = inputs.steps
    else:
        sync_count = min(inputs.steps, synchronous_steps(warmup_steps))
    mean = (sync_count * sync_step + (inputs.steps - sync_count) * async_step) / inputs.steps
    return LayoutEstimate(ranks=ranks, split_cfg=shape.split, patches=shape.patches, batch_per_rank=shape.batch,
                          compute_ms=compute, received_mib=mib, comm_ms=comm, gather_ms=gather,
                          sync_step_ms=sync_step, async_step_ms=async_step, exposed_ms=exposed,
                          synchronous_steps=sync_count,
                          mean_step_ms=mean)


def candidate_layouts(inputs: AutoParallelInputs) -> list[tuple[int, bool]]:
    """(ranks, split_cfg) for every usable GPU count: without the split, and with it where it applies;
    layouts with more patches than the height has slab units are left out."""
    layouts = []
    for ranks in range(1, inputs.gpus + 1):
        for split in (False, True):
            shape = group_shape(ranks, inputs.guided, split and inputs.allow_cfg_split, inputs.num_images)
            if shape.split != split or shape.patches > inputs.slab_units:
                continue
            layouts.append((ranks, split))
    return layouts


def default_warmup_steps(steps: int) -> int:
    """The default warm-up (DEFAULT_WARMUP_STEPS), but at most one step in WARMUP_SHARE_LIMIT, and at
    least one (an asynchronous step needs a synchronous one before it)."""
    return max(1, min(DEFAULT_WARMUP_STEPS, steps // WARMUP_SHARE_LIMIT))


def choose_parallel(inputs: AutoParallelInputs) -> ParallelChoice:
    patched_warmup = inputs.warmup_steps if inputs.warmup_steps is not None else default_warmup_steps(inputs.steps)
    table = tuple(estimate_layout(inputs, ranks, split, patched_warmup) for ranks, split in candidate_layouts(inputs))
    fastest = min(table, key=lambda e: e.mean_step_ms)
    close_enough = [e for e in table if e.mean_step_ms <= fastest.mean_step_ms * (1 + SIMPLER_LAYOUT_TOLERANCE)]
    chosen = min(close_enough, key=lambda e: (e.ranks, e.patches, e.mean_step_ms))
    warmup = _chosen_warmup(inputs, chosen, patched_warmup)
    reasons = _reasons(inputs, table, chosen, fastest, warmup)
    return ParallelChoice(split_cfg=chosen.split_cfg, ranks=chosen.ranks, patches=chosen.patches,
                          warmup_steps=warmup, estimated_step_ms=chosen.mean_step_ms, table=table, reasons=reasons)


def _chosen_warmup(inputs: AutoParallelInputs, chosen: LayoutEstimate, patched_warmup: int) -> int:
    if inputs.warmup_steps is not None:
        return inputs.warmup_steps
    return patched_warmup if chosen.patches > 1 else 0


# --- the explanation -------------------------------------------------------------------------------


def _reasons(inputs, table, chosen, fastest, warmup) -> tuple[str, ...]:
    single = next(e for e in table if e.ranks == 1)
    lines = [_header(inputs), _verdict(chosen, single, warmup)]
    lines.append(f"- {_cost_breakdown(inputs, chosen)}")
    lines.extend(f"- {limit}" for limit in _what_limits_the_candidates(inputs))
    if chosen is not fastest:
        lines.append(f"- {fastest.describe()} is estimated at {fastest.mean_step_ms:.1f} ms/step, within "
                     f"{SIMPLER_LAYOUT_TOLERANCE:.0%} of the chosen layout, which uses fewer GPUs or patches")
    for other in _alternatives(inputs, table, chosen, fastest):
        lines.append(f"- rejected {other.describe()}: {other.mean_step_ms:.1f} ms/step; "
                     f"{_cost_breakdown(inputs, other)}")
    if chosen.ranks < inputs.gpus:
        lines.append(f"- uses {chosen.ranks} of the {inputs.gpus} GPUs given: more would not be faster")
    lines.append(f"- {_warmup_reason(inputs, chosen, warmup)}")
    return tuple(lines)


def _what_limits_the_candidates(inputs: AutoParallelInputs) -> list[str]:
    limits = []
    if inputs.gpus == 1:
        limits.append("one GPU given: nothing to split")
    if not inputs.guided:
        limits.append("unguided (guidance <= 1): no CFG halves to split, patches only")
    elif not inputs.allow_cfg_split:
        limits.append("CFG split excluded (--no-split-cfg / split_cfg = false): patches only")
    if inputs.gpus > inputs.slab_units:
        limits.append(f"at most {inputs.slab_units} patches per patch group: {inputs.height} rows in slab units "
                      f"of {inputs.slab_unit_px}")
    return limits


def _header(inputs: AutoParallelInputs) -> str:
    figures = inputs.figures
    guidance = "guided (CFG batch of 2 halves)" if inputs.guided else "unguided"
    return (f"parallel auto: {inputs.gpus} GPU(s), {inputs.height}x{inputs.width}, {guidance}, "
            f"{inputs.num_images} image(s), {inputs.steps} steps; {figures.family} figures: one-GPU UNet step "
            f"{figures.step_ms:.1f} ms at {figures.reference_height}x{figures.reference_width} batch 2 "
            f"({figures.fixed_ms:g} ms of it fixed per-step overhead); interconnect {inputs.interconnect.describe()}"
            + ("" if wire_fraction(inputs.exchange_dtype) == 1.0 else
               f"; exchange {inputs.exchange_dtype}: asynchronous steps send {wire_fraction(inputs.exchange_dtype):g}x "
               "the bytes"))


def _verdict(chosen: LayoutEstimate, single: LayoutEstimate, warmup: int) -> str:
    speedup = single.mean_step_ms / chosen.mean_step_ms
    return (f"chose {chosen.describe()} (batch {chosen.batch_per_rank} per rank), {warmup} warm-up step(s): "
            f"~{chosen.mean_step_ms:.1f} ms/step, {speedup:.2f}x one GPU ({single.mean_step_ms:.1f} ms/step)")


def _cost_breakdown(inputs: AutoParallelInputs, estimate: LayoutEstimate) -> str:
    compute = f"compute {estimate.compute_ms:.1f} ms per rank"
    if estimate.ranks == 1:
        return f"{compute}, nothing to exchange"
    if estimate.patches == 1:
        return (f"{compute} (each GPU one guidance half, exact), no exchange between slabs, "
                f"output gather {estimate.gather_ms:.2f} ms")
    hidden = ("hidden behind the compute" if estimate.exposed_ms <= 0
              else f"{estimate.exposed_ms:.1f} ms of it exposed in every asynchronous step")
    return (f"{compute}; receives {estimate.received_mib:.1f} MiB per step = {estimate.comm_ms:.1f} ms at "
            f"{inputs.interconnect.gbytes_per_s:g} GB/s with {inputs.figures.layer_collectives} collectives, "
            f"{hidden}; {estimate.synchronous_steps} synchronous step(s) at {estimate.sync_step_ms:.1f} ms")


def _alternatives(inputs, table, chosen, fastest) -> list[LayoutEstimate]:
    """The best layout of every other kind (one GPU, CFG split only, patches only, both), and the best
    one on all the GPUs given when the choice uses fewer."""
    best = {}
    for estimate in table:
        if estimate.kind != chosen.kind and (estimate.kind not in best
                                             or estimate.mean_step_ms < best[estimate.kind].mean_step_ms):
            best[estimate.kind] = estimate
    alternatives = list(best.values())
    on_all_gpus = [e for e in table if e.ranks == inputs.gpus]
    if chosen.ranks < inputs.gpus and on_all_gpus:
        best_on_all = min(on_all_gpus, key=lambda e: e.mean_step_ms)
        if best_on_all not in alternatives and best_on_all is not fastest:
            alternatives.append(best_on_all)
    return sorted(alternatives, key=lambda e: e.mean_step_ms)


def _warmup_reason(inputs: AutoParallelInputs, chosen: LayoutEstimate, warmup: int) -> str:
    if inputs.warmup_steps is not None:
        return f"warm-up: {warmup} step(s), as given"
    if inputs.all_steps_synchronous:
        return f"warm-up: {warmup} (every step is synchronous in this mode)"
    if chosen.patches == 1:
        return ("warm-up: 0 (the first step runs synchronously anyway): with one slab per group nothing is "
                "stale, so warm-up steps buy no quality")
    return (f"warm-up: {warmup} of {inputs.steps} steps: the default {DEFAULT_WARMUP_STEPS}, at most one step in "
            f"{WARMUP_SHARE_LIMIT} (docs/quality.md: at N = 4, 24.8 dB PSNR with 1, 26.2 with 2, 28.1 with 4)")


def format_table(table, chosen: LayoutEstimate | None = None) -> str:
    header = ("   | GPUs | layout | patches | batch/rank | compute ms | received MiB | comm ms | "
              "warm-up step ms | async step ms | mean ms/step |")
    rule = "   |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    rows = [header, rule]
    for e in table:
        mark = " * " if e is chosen else "   "
        rows.append(f"{mark}| {e.ranks} | {e.kind} | {e.patches} | {e.batch_per_rank} | {e.compute_ms:.1f} | "
                    f"{e.received_mib:.1f} | {e.comm_ms:.1f} | {e.sync_step_ms:.1f} | {e.async_step_ms:.1f} | "
                    f"{e.mean_step_ms:.1f} |")
    return "\n".join(rows)


# --- a measured step in place of the assumed one ----------------------------------------------------


def with_measured_step(figures: ModelFigures, height: int, width: int, step_ms: float) -> ModelFigures:
    """``figures`` whose reference step time is derived from ``step_ms``, a measured one-GPU UNet step
    (batch 2) at ``height`` x ``width``, through the same pixel scaling the model uses."""
    scale = height * width / (figures.reference_height * figures.reference_width)
    pixel_factor = (1 - figures.attention_share) * scale + figures.attention_share * scale ** 2
    if step_ms <= figures.fixed_ms:
        raise ValueError(f"measured step_ms must be > the fixed overhead {figures.fixed_ms:g} ms, got {step_ms!r}")
    return replace(figures, step_ms=figures.fixed_ms + (step_ms - figures.fixed_ms) / pixel_factor)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m python_backend.core.auto_parallel",
                                     description="print the --parallel auto cost model's table and choice")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="> 1: guided (a CFG batch)")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--family", choices=sorted(FIGURES), default="sdxl")
    parser.add_argument("--interconnect", default="nvlink", help="nvlink, pcie or a bandwidth in GB/s")
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: chosen")
    parser.add_argument("--no-split-cfg", action="store_true", help="patches only")
    parser.add_argument("--exchange-dtype", default="native", help="as build/generate's --exchange-dtype")
    parser.add_argument("--measured-step-ms", type=float, default=None,
                        help="your one-GPU UNet step (batch 2) at --height x --width, in place of the assumed one")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        figures = FIGURES[args.family]
        if args.measured_step_ms is not None:
            figures = with_measured_step(figures, args.height, args.width, args.measured_step_ms)
        inputs = AutoParallelInputs(
            gpus=args.gpus, height=args.height, width=args.width, guided=args.guidance > 1,
            num_images=args.num_images, steps=args.steps, figures=figures,
            interconnect=interconnect_from_text(args.interconnect), warmup_steps=args.warmup_steps,
            allow_cfg_split=not args.no_split_cfg, exchange_dtype=args.exchange_dtype,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(choose_parallel(inputs).explain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
