"""The patch-parallel denoising loop of one generation on one rank.

Every rank holds the full latent, runs the UNet on its slab (of its CFG half, when split), all-gathers
the output slabs, and steps the scheduler on the full latent, so all ranks stay identical.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .context import PatchContext
from .defaults import DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_SCHEDULER, DEFAULT_SEED, DEFAULT_STEPS, DEFAULT_WIDTH
from .exchange import BufferExchange
from .exchange_codec import CodecSpec, ExchangeCodec
from .layout import PatchLayout
from .model import Conditioning, encode_prompt, make_scheduler, unet_downsampling_factor
from .parallel import ParallelConfig
from .patch_layers import patch_unet
from .placement import Placement, for_unet
from .ranks import PatchPlan, RankGroup
from .transport import BufferTransport

log = logging.getLogger("distrifusion.denoise")


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = DEFAULT_SEED
    num_images: int = 1

    @property
    def guided(self) -> bool:
        return self.guidance > 1.0


@dataclass
class GenerationResult:
    latents: torch.Tensor  # final latents [B, 4, H/8, W/8]
    unet_seconds: list[float] = field(default_factory=list)  # this rank's UNet time per step
    wait_seconds: float = 0.0  # time this rank spent waiting for layer exchanges
    events: list = field(default_factory=list)  # the layer exchange's log (ExchangeEvent)
    image: torch.Tensor | None = None  # the decoded image [B, 3, H, W] in [-1, 1], where the ranks decoded


UNetStep = Callable[[torch.Tensor, torch.Tensor, Conditioning, BufferTransport], torch.Tensor]


class StepEngines(Protocol):
    """What runs the asynchronous steps instead of the eager UNet (``engines.EngineSet``)."""

    def for_generation(self, plan: PatchPlan, layout: PatchLayout, request: GenerationRequest) -> UNetStep:
        """The step function for this rank's slab, checked against what was built for ``request``."""


class PatchParallelDenoiser:
    """Owns one rank's patched UNet and runs generations on it."""

    exchange_class: type[BufferTransport] = BufferExchange  # the layers' transport (benchmarks swap in variants)

    def __init__(self, pipe, ranks: RankGroup, parallel: ParallelConfig, engines: StepEngines | None = None):
        self.pipe = pipe
        self.engines = engines
        self.ranks = ranks
        self.parallel = parallel
        self.factor = unet_downsampling_factor(pipe.unet.config)
        self.vae_scale = pipe.vae_scale_factor
        self.context = PatchContext(
            layout=PatchLayout((1,), self.factor),
            exchange=BufferExchange(None, 0, 1),
            mode=parallel.mode,
            warmup_steps=parallel.warmup_steps,
        )
        patch_unet(pipe.unet, self.context)
        # Each block's freshly published buffers leave together when the block ends (one collective).
        unet = pipe.unet
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.register_forward_hook(lambda *_: self.context.exchange.flush())

    def rejoin(self, ranks: RankGroup) -> None:
        """Serve on a new rank group (after a restart) with the model already loaded."""
        self.ranks = ranks

    @torch.no_grad()
    def generate(
        self, request: GenerationRequest, parallel: ParallelConfig | None = None, on_step=None,
        cond: Conditioning | None = None, should_stop=None, stoppable: bool = False,
    ) -> GenerationResult:
        """Final latents of ``request``; every rank calls this with the same arguments.

        ``cond`` is the full guided conditioning when the prompt was encoded elsewhere (a text
        encoder model, another rank), on any device and in any floating dtype: it is placed on this
        rank's device in its UNet's dtype here (``placement``); without it the prompt is encoded here.
        With ``stoppable`` (on every rank), ``should_stop`` (read on rank 0 at every step boundary)
        cancels the generation on every rank: ``GenerationCancelled``; without it no per-step decision
        is exchanged. A request that some rank cannot run raises ``GenerationRefused`` on every rank.
        ``on_step(i, synchronous, latents)`` runs after step ``i`` with the full latents after it.
        """
        pipe, device = self.pipe, self.ranks.device
        parallel = parallel or self.parallel
        placement = Placement.of_unet(pipe.unet, device)
        problem = None
        try:  # everything a rank can refuse, before the first collective
            plan, engine, cond = self._prepare(request, parallel, cond, placement)
        except Exception as error:
            problem = error
        self._agree_prepared(problem)
        outputs = self._output_gather(plan)
        # diffusers' prepare_latents and prepare_extra_step_kwargs read pipe.scheduler.
        pipe.scheduler = scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
        scheduler.set_timesteps(request.steps, device=device)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = pipe.prepare_latents(
            request.num_images, pipe.unet.config.in_channels, request.height, request.width,
            placement.dtype, device, generator,
        )
        step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)

        result = GenerationResult(latents=latents)
        self.context.begin_generation()
        for i, t in enumerate(scheduler.timesteps):
            self.context.begin_step(i)
            model_input = torch.cat([latents] * 2) if request.guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            if plan.branch is not None:
                model_input = model_input.chunk(2)[plan.branch]
            started = time.perf_counter()
            if engine is not None and not self.context.synchronous:
                # Engines serve the asynchronous steps; synchronous ones need blocking exchanges.
                local = engine(model_input, t, cond, self.context.exchange).to(model_input.dtype)
            else:
                local = pipe.unet(
                    model_input, t, encoder_hidden_states=cond.prompt_embeds,
                    added_cond_kwargs=cond.added_cond_kwargs, return_dict=False,
                )[0]
                self.context.exchange.flush()  # conv_out's halo buffers, after the last block
            _synchronize(device)
            result.unet_seconds.append(time.perf_counter() - started)
            noise = outputs.assemble(local)
            if request.guided:
                uncond, text = noise.chunk(2)
                noise = uncond + request.guidance * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
            if on_step is not None:
                on_step(i, self.context.synchronous, latents)
            if stoppable and i + 1 < len(scheduler.timesteps) and self._stop_everywhere(should_stop):
                self.context.end_generation()
                raise GenerationCancelled(f"stopped after step {i + 1} of {len(scheduler.timesteps)}")
        self.context.end_generation()
        result.latents = latents
        result.events = list(self.context.exchange.events)
        result.wait_seconds = self.context.exchange.wait_seconds
        return result


    def _prepare(self, request: GenerationRequest, parallel: ParallelConfig, cond: Conditioning | None,
                 placement: Placement):
        """This rank's plan, engine (or None) and placed conditioning for ``request``."""
        self.context.mode, self.context.warmup_steps = parallel.mode, parallel.warmup_steps
        plan = self.ranks.plan(request.guided, parallel.split_cfg)
        latent_height = request.height // self.vae_scale
        self.context.layout = PatchLayout.split(latent_height, plan.size, self.factor, plan.index)
        self.context.exchange = self._exchange_for(self.context.exchange, plan.group, plan.index, plan.size,
                                                   CodecSpec.parse(parallel.exchange_dtype))
        engine = None if self.engines is None else self.engines.for_generation(plan, self.context.layout, request)
        if cond is None:
            if getattr(self.pipe, "text_encoder", None) is None:
                raise ValueError("this rank loaded the UNet only: the generation must bring its conditioning")
            cond = encode_prompt(
                self.pipe, request.prompt, request.negative_prompt, request.num_images, request.guided,
                request.height, request.width,
            )
        cond = for_unet(cond, placement)
        if plan.branch is not None:
            cond = cond.half(plan.branch)
        return plan, engine, cond

    def _exchange_for(self, current, group, index: int, size: int, spec: CodecSpec) -> BufferTransport:
        """The layers' exchange for this generation: the last one while the group and the codec are the
        same, so its registered storage serves again; a new one otherwise."""
        codec = None if spec.lossless or size == 1 else ExchangeCodec(spec, index, size)
        if (type(current) is self.exchange_class and getattr(current, "group", None) is group
                and current.index == index and current.size == size
                and getattr(getattr(current, "codec", None), "spec", None) == getattr(codec, "spec", None)):
            return current
        exchange = self.exchange_class(group, index, size)
        if codec is not None:
            if not hasattr(exchange, "codec"):
                raise ValueError(f"--exchange-dtype {spec}: {type(exchange).__name__} sends buffers only as they are")
            exchange.codec = codec
        return exchange

    def _output_gather(self, plan) -> "_OutputGather":
        kept = getattr(self, "_outputs", None)
        if kept is None or kept.ranks is not self.ranks or kept.plan != plan:
            kept = self._outputs = _OutputGather(self.ranks, plan)
        kept.layout = self.context.layout
        kept.exchange.reset()  # releases the storage of an earlier size
        return kept

    def _agree_prepared(self, problem: Exception | None) -> None:
        """Every rank learns whether any rank could not prepare the request; then all of them raise
        ``GenerationRefused`` together (and stay up for the next request) or all of them go on."""
        failed = problem is not None
        if self.ranks.world_size > 1 and self.ranks.control is not None:
            import torch.distributed as dist

            flags = torch.zeros(self.ranks.world_size, dtype=torch.int64)
            flags[self.ranks.rank] = int(failed)
            dist.all_reduce(flags, group=self.ranks.control)
            failed_ranks = [r for r, flag in enumerate(flags.tolist()) if flag]
        else:
            failed_ranks = [0] if failed else []
        if not failed_ranks:
            return
        if problem is not None:
            raise GenerationRefused(str(problem)) from problem
        raise GenerationRefused(f"rank(s) {failed_ranks} could not run this request (their logs say why)")

    def _stop_everywhere(self, should_stop) -> bool:
        """Rank 0's answer to ``should_stop``, agreed by every rank at the same step boundary."""
        stop = bool(should_stop()) if should_stop is not None and self.ranks.rank == 0 else False
        if self.ranks.world_size == 1 or self.ranks.control is None:
            return stop
        import torch.distributed as dist

        flag = torch.tensor([1 if stop else 0])
        dist.broadcast(flag, src=0, group=self.ranks.control)
        return bool(flag.item())


class GenerationCancelled(RuntimeError):
    """A generation stopped at a step boundary (cancelled by the client or past its deadline)."""


class GenerationRefused(ValueError):
    """A rank could not run this request (e.g. engines built for another batch); every rank raised it
    before the first step, so the group is intact and serves the next request."""


class _OutputGather:
    """All-gathers the UNet's output slabs over the whole rank group and rebuilds the full batch."""

    def __init__(self, ranks: RankGroup, plan):
        import torch.distributed as dist

        self.ranks = ranks
        self.plan = plan
        self.layout: PatchLayout | None = None  # set for each generation
        self.exchange = BufferExchange(
            dist.group.WORLD if ranks.world_size > 1 else None, ranks.rank, ranks.world_size, record=False
        )
        self.copies = ranks.world_size // plan.size  # 2 when the CFG halves are split, else 1

    def assemble(self, local: torch.Tensor) -> torch.Tensor:
        rows = self.layout.scaled(local.shape[2])
        shapes = [(*local.shape[:2], r, local.shape[3]) for r in rows] * self.copies
        slabs = self.exchange.gather("unet_output", local, shapes)
        size = self.plan.size
        halves = [torch.cat(slabs[h * size : (h + 1) * size], dim=2) for h in range(self.copies)]
        return torch.cat(halves, dim=0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
