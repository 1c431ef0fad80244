"""Communication volume of displaced patch parallelism on the real SDXL UNet, computed from shapes.

    python benchmarks/comm_volume.py [--height 1024 --width 1024] [--ranks 2 4 8] [--out docs/communication.md]

No weights and no devices: the UNet is built on PyTorch's ``meta`` device (tensors with shapes and
dtypes but no storage), patched with the project's own ``patch_unet``, and run once per configuration.
The patch layers publish their buffers through ``PatchContext`` exactly as in a real run; the context's
``BufferExchange`` is replaced by ``CountingExchange`` below, which records what each call publishes
and hands back correctly shaped (meta) tensors so the forward proceeds. Each patch-aware layer exchanges
once per UNet call, so one forward is one denoising step. (Every op of the SDXL forward, scaled dot
product attention and nearest upsampling included, has a meta kernel in torch 2.13, so no workaround
is needed.)

Volumes are per rank per step:
  published  the bytes this rank contributes (its tensor);
  received   the bytes an all-gather delivers to it: every other rank's buffer, padded (as
             ``BufferExchange`` pads unequal slabs) to the group's largest buffer.
Conv halo rows travel point to point to the two neighbouring ranks only (``route_to_neighbours``), so a
middle rank receives two halo buffers per layer, not N - 1.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Make the package importable when the script is run from a checkout without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from python_backend.core.context import PatchContext  # noqa: E402
from python_backend.core.exchange import BufferExchange  # noqa: E402
from python_backend.core.layout import PatchLayout  # noqa: E402
from python_backend.core.modes import Mode  # noqa: E402
from python_backend.core.patch_layers import PatchConv2d, PatchGroupNorm, PatchSelfAttentionProcessor, patch_unet  # noqa: E402

# The UNet of stabilityai/stable-diffusion-xl-base-1.0 (its unet/config.json), written out so that
# nothing is downloaded. Note that diffusers' SDXL config says ``attention_head_dim`` but means the
# number of heads (5, 10, 20 heads of 64 channels).
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
VAE_SCALE = 8  # pixels per latent row (SDXL's VAE)
TEXT_TOKENS = 77  # CLIP sequence length of the prompt embeddings
POOLED_DIM = 1280  # text_embeds; 1280 + 6 time ids * 256 = 2816 = projection_class_embeddings_input_dim
DTYPE = torch.float16

CONV, ATTN, NORM, OUTPUT = "conv halo", "self-attention K/V", "GroupNorm stats", "UNet output all-gather"
LAYER_KINDS = (CONV, ATTN, NORM)


@dataclass
class Publish:
    key: str
    kind: str
    op: str  # "gather" (blocking) or "start" (async)
    numel: int  # elements this rank published
    element_size: int  # bytes per element as published (fp16 activations, float32 GroupNorm moments)
    padded_numel: int  # elements each rank puts on the wire (the group's largest buffer)
    group_size: int
    total_numel: int  # elements of all ranks' buffers together (unpadded): the layer's full tensor
    shapes: tuple = ()  # every rank's shape
    neighbours_only: bool = False  # sent point to point to the ranks above and below, not all-gathered

    @property
    def senders(self) -> int:
        """How many ranks' buffers a middle rank receives for this publication."""
        return min(2, self.group_size - 1) if self.neighbours_only else self.group_size - 1

    def published(self, element_size: int | None = None) -> int:
        # A group of one rank (pure CFG parallelism) moves nothing: BufferExchange skips the collective.
        return 0 if self.group_size == 1 else self.numel * (element_size or self.element_size)

    def received(self, element_size: int | None = None) -> int:
        return self.senders * self.padded_numel * (element_size or self.element_size)


class CountingExchange(BufferExchange):
    """A ``BufferExchange`` that moves nothing: it records each publication and returns empty tensors
    of every rank's shape (on the publisher's device, i.e. meta here), so the patched forward runs.

    It overrides the three public entry points rather than the collective inside them, so it does not
    depend on the exchange's internals; its base state (``_latest``) stays empty.
    """

    def __init__(self, index: int, size: int, kinds: dict[str, str]):
        super().__init__(group=None, index=index, size=size, record=False)
        self.kinds = kinds
        self.log: list[Publish] = []
        self._shapes: dict[str, tuple[torch.Tensor, list[tuple[int, ...]]]] = {}

    def gather(self, key, tensor, shapes):
        self._publish("gather", key, tensor, shapes)
        return self._result(key)

    def start(self, key, tensor, shapes):
        self._publish("start", key, tensor, shapes)

    def latest(self, key):
        return self._result(key) if key in self._shapes else None

    def _publish(self, op, key, tensor, shapes):
        shapes = [tuple(s) for s in shapes]
        if tuple(tensor.shape) != shapes[self.index]:  # the same check the real exchange makes
            raise ValueError(f"{key}: published shape {tuple(tensor.shape)} != expected {shapes[self.index]}")
        padded = max(math.prod(s) for s in shapes)
        kind = self.kinds[key]  # KeyError: a layer layer_kinds() did not classify
        total = sum(math.prod(s) for s in shapes)
        self.log.append(Publish(key, kind, op, tensor.numel(), tensor.element_size(), padded, self.size, total,
                                tuple(shapes), key in self._to_neighbours))
        self._shapes[key] = (tensor, shapes)

    def _result(self, key):
        tensor, shapes = self._shapes[key]
        return [tensor.new_empty(s) for s in shapes]


def build_unet():
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    # .to(float16) below makes diffusers warn about modules to keep in float32; SDXL's UNet has none
    # (the warning itself lists []), so it is noise here.
    diffusers_logging.set_verbosity_error()
    # On the meta device the 2.6 B parameters take no memory and no time to "initialise".
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    return unet.to(DTYPE).eval()


def layer_kinds(unet: nn.Module) -> dict[str, str]:
    """Exchange key -> layer kind, from the wrapper types ``patch_unet`` installed."""
    kinds = {}
    for module in unet.modules():
        if isinstance(module, PatchConv2d):
            kinds[module.key] = CONV
        elif isinstance(module, PatchGroupNorm):
            kinds[module.key] = NORM
        elif isinstance(getattr(module, "processor", None), PatchSelfAttentionProcessor):
            kinds[module.processor.key] = ATTN
    return kinds


def unet_inputs(batch: int, latent_h: int, latent_w: int):
    meta = dict(device="meta", dtype=DTYPE)
    sample = torch.empty(batch, SDXL_UNET_CONFIG["in_channels"], latent_h, latent_w, **meta)
    return dict(
        sample=sample,
        timestep=torch.empty((), device="meta", dtype=torch.float32),
        encoder_hidden_states=torch.empty(batch, TEXT_TOKENS, SDXL_UNET_CONFIG["cross_attention_dim"], **meta),
        added_cond_kwargs={
            "text_embeds": torch.empty(batch, POOLED_DIM, **meta),
            "time_ids": torch.empty(batch, 6, **meta),
        },
        return_dict=False,
    )


@dataclass
class Measurement:
    patches: int  # N: ranks in one patch group
    batch: int  # per-rank UNet batch: 2 without CFG split, 1 with it
    copies: int  # patch groups (2 with CFG split, else 1); GPUs = patches * copies
    layers: list[Publish]  # one step's layer publications (rank 0)
    output: Publish  # the UNet output all-gather over all GPUs
    async_matches: bool  # an asynchronous (default-mode) step published exactly the same

    @property
    def gpus(self) -> int:
        return self.patches * self.copies


def measure(unet: nn.Module, context: PatchContext, patches: int, batch: int, latent_h: int, latent_w: int) -> Measurement:
    """One step on rank 0 of an N-patch group, in full_sync and in the default asynchronous mode.

    Rank 0 is enough: with unequal slabs the first ranks hold the larger ones (so rank 0 publishes the
    most), and what a rank receives is the same for every rank because buffers are padded to the largest.
    """
    factor = 2 ** (len(SDXL_UNET_CONFIG["block_out_channels"]) - 1)
    context.layout = PatchLayout.split(latent_h, patches, factor, index=0)
    kinds = layer_kinds(unet)
    context.exchange = CountingExchange(0, patches, kinds)
    inputs = unet_inputs(batch, latent_h, latent_w)

    # Step 0 is a warm-up step: every layer exchanges synchronously (blocking gather).
    context.mode = Mode.CORRECTED_ASYNC_GN
    context.begin_generation()
    context.begin_step(0)
    with torch.no_grad():
        local = unet(**inputs)[0]
    sync_log = list(context.exchange.log)

    # The first asynchronous step: every layer starts an async all-gather of the same buffer instead.
    context.exchange.log.clear()
    context.begin_step(context.warmup_steps)
    with torch.no_grad():
        unet(**inputs)
    async_log = context.exchange.log
    async_matches = [(p.key, p.numel, p.padded_numel) for p in sync_log] == [
        (p.key, p.numel, p.padded_numel) for p in async_log
    ] and all(p.op == "start" for p in async_log)

    rows = context.layout.scaled(local.shape[2])
    if sum(rows) != latent_h or local.shape[0] != batch:
        raise AssertionError(f"unexpected UNet output slab {tuple(local.shape)}")
    # The output all-gather runs over every GPU (both CFG groups), as in denoise._OutputGather.
    copies = 2 if batch == 1 else 1
    shapes = [(*local.shape[:2], r, local.shape[3]) for r in rows] * copies
    out_exchange = CountingExchange(0, patches * copies, {"unet_output": OUTPUT})
    out_exchange.gather("unet_output", local, shapes)
    return Measurement(patches, batch, copies, sync_log, out_exchange.log[0], async_matches)


def activation_volume(latent_h: int, latent_w: int, batch: int = 2) -> int:
    """Bytes of every leaf module's output in one unpatched full-image UNet step (fp16): context only."""
    unet = build_unet()
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    for module in unet.modules():
        if not any(True for _ in module.children()):
            module.register_forward_hook(count)
    with torch.no_grad():
        unet(**unet_inputs(batch, latent_h, latent_w))
    return total


# --- reporting -----------------------------------------------------------------------------------


def fmt(nbytes: float) -> str:
    if nbytes == 0:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


@dataclass
class Row:
    kind: str
    layers: int  # distinct layers
    collectives: int  # per step: each layer exchanges once per step, none in a group of one rank
    published: int
    received: int
    received_fp32: int


def summarise(m: Measurement) -> list[Row]:
    by_kind: dict[str, list[Publish]] = defaultdict(list)
    for p in m.layers:
        by_kind[p.kind].append(p)
    rows = []
    for kind in LAYER_KINDS:
        ps = by_kind.get(kind, [])
        if len({p.key for p in ps}) != len(ps):
            raise AssertionError(f"a {kind} layer exchanged more than once in one step")
        rows.append(Row(
            kind, len(ps), sum(p.group_size > 1 for p in ps),
            sum(p.published() for p in ps), sum(p.received() for p in ps),
            # fp32 everywhere: activations double; the moments are float32 already.
            sum(p.received(4) for p in ps),
        ))
    o = m.output
    rows.append(Row(OUTPUT, 1, int(o.group_size > 1), o.published(), o.received(), o.received(4)))
    rows.append(Row(
        "total", sum(r.layers for r in rows), sum(r.collectives for r in rows), sum(r.published for r in rows),
        sum(r.received for r in rows), sum(r.received_fp32 for r in rows),
    ))
    return rows


HEADER = ["N patches", "batch/rank", "GPUs", "kind", "layers", "published/rank", "received/rank", "received/rank (all fp32)"]


def detail_table(measurements: list[Measurement]) -> list[list[str]]:
    table = []
    for m in measurements:
        for r in summarise(m):
            table.append([
                str(m.patches), str(m.batch), str(m.gpus), r.kind, str(r.layers),
                fmt(r.published), fmt(r.received), fmt(r.received_fp32),
            ])
    return table


def gpu_table(measurements: dict[tuple[int, int], Measurement], gpu_counts: list[int]) -> list[list[str]]:
    """Per GPU count: CFG split off (N = GPUs, batch 2) against on (two groups of N = GPUs/2, batch 1)."""
    table = []
    for g in gpu_counts:
        for split, key in ((False, (g, 2)), (True, (g // 2, 1))):
            if split and g % 2:
                continue
            m = measurements[key]
            rows = {r.kind: r for r in summarise(m)}
            table.append([
                str(g), "yes" if split else "no", str(m.patches), str(m.batch),
                str(rows["total"].collectives - rows[OUTPUT].collectives),
                fmt(rows["total"].received), fmt(rows[ATTN].received),
                f"{rows[ATTN].received / rows['total'].received:.0%}" if rows["total"].received else "-",
            ])
    return table


GPU_HEADER = ["GPUs", "CFG split", "N patches/group", "batch/rank", "layer collectives/step",
              "received/rank/step", "of which K/V", "K/V share"]


def text_table(header, rows) -> str:
    """Numbers right-aligned, the text column ("kind") left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    left = [h == "kind" for h in header]

    def line(cells):
        return "  ".join(c.ljust(w) if is_left else c.rjust(w) for c, w, is_left in zip(cells, widths, left))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h == "kind" else "---:" for h in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def expected_halo_bytes(unet: nn.Module, batch: int, latent_w: int) -> int:
    """Conv halo bytes published per step by the by-hand formula, from the module tree alone:
    each 3x3 conv publishes 2 rows x W x C_in x batch x 2 bytes, W being the width at its level."""
    levels = len(SDXL_UNET_CONFIG["block_out_channels"])
    total = 0
    for module in unet.modules():
        if not isinstance(module, PatchConv2d):
            continue
        parts = module.key.split(".")
        if parts[0] == "down_blocks":  # its resnets and downsampler read level i
            level = int(parts[1])
        elif parts[0] == "mid_block":
            level = levels - 1
        elif parts[0] == "up_blocks":  # resnets read level L-1-i; the upsampler's conv one level finer
            level = levels - 1 - int(parts[1]) - (parts[2] == "upsamplers")
        else:  # conv_out
            level = 0
        total += module.halo.rows * (latent_w >> level) * module.conv.in_channels * batch * 2
    return total


def check(unet: nn.Module, measurements: dict[tuple[int, int], Measurement], latent_w: int) -> None:
    """Invariants of the design; they guard this script's counting, not the project."""
    for (n, b), m in measurements.items():
        if not m.async_matches:
            raise AssertionError(f"N={n} batch={b}: the asynchronous step published differently")
        rows = {r.kind: r for r in summarise(m)}
        if rows[CONV].published != (expected_halo_bytes(unet, b, latent_w) if n > 1 else 0):
            raise AssertionError(f"N={n} batch={b}: conv halo bytes disagree with 2 x W x C_in x batch x 2 per conv")
        if b == 2 and (n, 1) in measurements:
            halved = {r.kind: r for r in summarise(measurements[(n, 1)])}
            if any(rows[k].published != 2 * halved[k].published for k in LAYER_KINDS):
                raise AssertionError(f"N={n}: batch 1 does not publish half of batch 2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8],
                        help="N: patches (= ranks) per patch group; each is measured at batch 2 and batch 1")
    parser.add_argument("--out", default="docs/communication.md", help="markdown page to write ('' for none)")
    args = parser.parse_args(argv)
    if args.height % VAE_SCALE or args.width % VAE_SCALE:
        parser.error(f"height and width must be multiples of {VAE_SCALE}")
    latent_h, latent_w = args.height // VAE_SCALE, args.width // VAE_SCALE
    started = time.perf_counter()

    unet = build_unet()
    # The layout and exchange are replaced per configuration in measure().
    context = PatchContext(layout=PatchLayout((1,), 4), exchange=CountingExchange(0, 1, {}))
    patch_unet(unet, context)

    # Batch 2: every rank runs both CFG halves. Batch 1: CFG split, N ranks per half (2N GPUs); for the
    # per-GPU summary also N = GPUs/2 at batch 1 (N = 1 is pure CFG parallelism: no layer exchange).
    configs = [(n, b) for n in args.ranks for b in (2, 1)]
    configs += [(g // 2, 1) for g in args.ranks if g % 2 == 0 and (g // 2, 1) not in configs]
    measurements = {(n, b): measure(unet, context, n, b, latent_h, latent_w) for n, b in configs}
    shown = [measurements[(n, b)] for n in args.ranks for b in (2, 1)]

    detail = detail_table(shown)
    per_gpu = gpu_table(measurements, args.ranks)
    activations = activation_volume(latent_h, latent_w)
    elapsed = time.perf_counter() - started

    check(unet, measurements, latent_w)

    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    summary = (
        f"SDXL UNet, {args.width}x{args.height} image (latent {latent_w}x{latent_h}), fp16 activations, "
        f"float32 GroupNorm moments; per rank, per denoising step.\n"
        f"One full-image UNet step at batch 2 (unpatched) produces {fmt(activations)} of leaf-module "
        f"outputs (fp16), for scale.\n"
        "Checked: conv halos match 2 rows x W x C_in x batch x 2 bytes per conv; batch 1 moves exactly half "
        "of batch 2 per layer kind; an asynchronous step (default mode) publishes exactly what a warm-up "
        "step does.\n"
    )
    print(summary)
    print(text_table(HEADER, detail))
    print()
    print(text_table(GPU_HEADER, per_gpu))
    print(f"\n({elapsed:.1f} s)")

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown_page(command, args, latent_h, latent_w, detail, per_gpu, activations, measurements))
        print(f"wrote {out}")
    return 0


def markdown_page(command, args, latent_h, latent_w, detail, per_gpu, activations, measurements) -> str:
    import diffusers

    n_max = max(args.ranks)
    m = measurements[(n_max, 2)]
    rows = {r.kind: r for r in summarise(m)}
    halo_all_gathered = sum((p.group_size - 1) * p.padded_numel * p.element_size for p in m.layers if p.kind == CONV)
    full_kv = sum(p.total_numel * p.element_size for p in m.layers if p.kind == ATTN)
    return f"""# Communication volume per denoising step

SDXL UNet (stabilityai/stable-diffusion-xl-base-1.0 configuration) at {args.width}x{args.height}
(latent {latent_w}x{latent_h}), displaced patch parallelism as implemented in `python_backend`.
All figures are **per rank, per denoising step**, binary units (1 MiB = 2^20 bytes). Activations
are fp16 (2 bytes/element); GroupNorm moments are float32 (4 bytes/element) as the design requires.
The last column repeats "received" with activations in fp32 as well.

Produced by:

```
{command}
```

(torch {torch.__version__}, diffusers {diffusers.__version__}; it runs in seconds on a CPU.)

## Per layer kind

- **N patches**: ranks in one patch group (horizontal slabs). **batch/rank** 2: no CFG split, every
  rank runs both guidance halves; 1: CFG split, two groups of N ranks (so 2N GPUs).
- **layers**: patch-aware layers of that kind; each exchanges exactly once per step, so this is
  also the number of collectives per step.
- **published**: bytes this rank contributes to the collectives.
- **received**: bytes the exchanges deliver to a middle rank: (N - 1) x the (padded) buffer per layer.
  Conv halo rows go point to point to the two neighbours only: a middle rank receives two halo
  buffers per layer (min(2, N - 1)), whatever N.
- **UNet output all-gather**: the output slabs, all-gathered over all GPUs (both CFG groups) at
  the end of every step so that every rank steps the scheduler on the full latent.

{markdown_table(HEADER, detail)}

## Per GPU count

The same GPUs used with and without the CFG split (N = 1 with split is pure CFG parallelism: no
layer exchange, only the output all-gather).

{markdown_table(GPU_HEADER, per_gpu)}

For scale: one unpatched full-image UNet step at batch 2 produces {fmt(activations)} of leaf-module
outputs (fp16).

## How it was computed

- The UNet is built from the SDXL configuration (written out in the script) on PyTorch's `meta`
  device: shapes and dtypes only, no weights, no memory. `patch_unet` swaps in the patch-aware
  layers; the `PatchContext`'s exchange is a counting stand-in for `BufferExchange` that records
  each publication (key, bytes, the group's shapes) and returns empty meta tensors of every rank's
  shape, so the forward runs to the end.
- Layers are classified by wrapper type: `PatchConv2d` (every conv with a 3x3 kernel except
  `conv_in`, which reads the full latent every rank holds) -> conv halo; `PatchSelfAttentionProcessor`
  (`attn1` of every transformer block; cross-attention needs nothing) -> self-attention K/V;
  `PatchGroupNorm` -> GroupNorm statistics.
- One UNet forward of rank 0 is one step. It is run as a warm-up step (blocking all-gathers) and as
  an asynchronous step of the default mode (`corrected_async_gn`, async all-gathers); both publish
  the same buffers. Modes `separate_gn` and `no_sync` skip the GroupNorm exchange, and `no_sync`
  exchanges nothing after the warm-up; the warm-up steps always exchange everything.
- Received = (group size - 1) x the largest buffer in the group, since `BufferExchange` pads
  unequal slabs to one size (conv halos: 2 x, from the neighbours; the end slabs have one). With
  equal slabs (as here) every middle rank sends and receives the same.
- Check by hand (conv halos): every 3x3 conv publishes 2 rows (its first and last) of its input,
  2 x W x C_in x batch x 2 bytes; e.g. `conv_out` at batch 2 reads 320 channels at width {latent_w}:
  2 x {latent_w} x 320 x 2 x 2 = {2 * latent_w * 320 * 2 * 2} bytes. The script recomputes the sum of this
  formula over all halo convs from the module tree (each conv's input channels and its level's
  width) and asserts that it equals the counted halo bytes.

## Reading the numbers

- Self-attention K/V dominate. The full K/V of one step at batch 2 is {fmt(full_kv)} (all
  self-attention layers, K and V of every token); each rank receives (N - 1)/N of it, so what a rank
  receives *grows* towards that full size as N grows, while its compute shrinks as 1/N.
- The halos go to the neighbours only: at N = {m.patches}, batch 2, a middle rank receives
  {fmt(rows[CONV].received)} of halo rows; all-gathered (as before) it received {fmt(halo_all_gathered)}.
- GroupNorm statistics and the output all-gather are negligible in bytes; the GroupNorm exchanges
  matter by their count (one collective per GroupNorm layer per step), blocking in the warm-up steps
  and in `full_sync`/`sync_gn`.
- With the CFG split, the same GPUs form groups of half the size at batch 1, which more than halves
  what each rank receives.
"""


if __name__ == "__main__":
    sys.exit(main())
