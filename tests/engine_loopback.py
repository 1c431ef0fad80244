"""Every rank's segment engines run one after another in this process, over a loopback exchange that
hands each rank in step k what every rank published in step k-1: the stale reads of the asynchronous
exchange, without a process group (one GPU cannot hold an NCCL group of two ranks). Used by
tests/test_device_engines.py (ONNX Runtime, here) and tests/test_gpu.py (TensorRT against ONNX Runtime)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from python_backend.core.model import Conditioning, ModelInfo, encode_prompt, load_pipeline


class LoopbackGroup:
    """The published buffers of ``size`` ranks: what was published in the previous step is what every
    rank reads now; ``end_step`` makes this step's the next step's."""

    def __init__(self, size: int, shapes: dict[str, list[tuple[int, ...]]]):
        self.size, self.shapes = size, shapes
        self.published: dict[str, list[torch.Tensor]] = {}
        self.pending: dict[str, list[torch.Tensor | None]] = {}

    def exchange(self, index: int) -> "LoopbackExchange":
        return LoopbackExchange(self, index)

    def end_step(self) -> None:
        for key, slots in self.pending.items():
            missing = [r for r, slot in enumerate(slots) if slot is None]
            assert not missing, f"{key}: ranks {missing} published nothing this step"
        self.published.update(self.pending)
        self.pending = {}


class LoopbackExchange:
    """One rank's side of a :class:`LoopbackGroup`, with the calls ``SegmentedUNet`` makes."""

    def __init__(self, group: LoopbackGroup, index: int):
        self.group, self.index = group, index
        self.queued: list[tuple[str, torch.Tensor]] = []

    def start(self, key: str, tensor: torch.Tensor, shapes) -> None:
        self.queued.append((key, tensor))

    def flush(self) -> None:
        for key, tensor in self.queued:
            slots = self.group.pending.setdefault(key, [None] * self.group.size)
            slots[self.index] = tensor.detach().clone()  # copied at flush, as BufferExchange's bundle is
        self.queued = []

    def latest(self, key: str) -> list[torch.Tensor]:
        slots = self.group.published.get(key)
        if slots is None:  # the warm-up step: nothing published yet
            return [torch.zeros(shape) for shape in self.group.shapes[key]]
        return slots


@dataclass
class StepInputs:
    """What every rank's UNet gets in each step: the full latent batch, the timestep, the conditioning
    (float32, on the CPU)."""

    samples: list[torch.Tensor]
    timesteps: list[float]
    cond: Conditioning


def step_inputs(model, height: int, width: int, steps: int, seed: int = 0) -> StepInputs:
    """Random latents for a guided batch (2), timesteps from 900 down, the prompt encoded by the model."""
    pipe = load_pipeline(model, torch.device("cpu"), torch.float32)
    cond = encode_prompt(pipe, "a photo of an astronaut", None, 1, True, height, width)
    info = ModelInfo.read(model)
    shape = (2, info.latent_channels, height // info.vae_scale, width // info.vae_scale)
    generator = torch.Generator().manual_seed(seed)
    samples = [torch.randn(shape, generator=generator) for _ in range(steps)]
    return StepInputs(samples, torch.linspace(900, 100, steps).tolist(), cond)


def run_ranks(unets, inputs: StepInputs, device, dtype, group_class=LoopbackGroup) -> list[list[torch.Tensor]]:
    """Each step's noise prediction of each rank (float32, on the CPU). A first pass over step 0's inputs
    fills the exchange (its stale reads are zeros) and is not returned: every returned step reads the
    buffers its previous step published."""
    cond = Conditioning(inputs.cond.prompt_embeds.to(device, dtype),
                        {k: v.to(device, dtype) for k, v in inputs.cond.added_cond_kwargs.items()})
    group = group_class(len(unets), unets[0].shapes)
    exchanges = [group.exchange(r) for r in range(len(unets))]
    results = []
    for sample, timestep in zip(inputs.samples[:1] + inputs.samples, inputs.timesteps[:1] + inputs.timesteps):
        sample = sample.to(device, dtype)
        # a copy: the engine's own output tensor is overwritten when its runner runs again
        results.append([unet(sample, timestep, cond, exchange).to("cpu", torch.float32, copy=True)
                        for unet, exchange in zip(unets, exchanges)])
        group.end_step()
    return results[1:]
