"""Where a request's tensors live: the one rule for placing them before a rank's UNet and for the copies
that travel between ranks.

Every generation enters through ``PatchParallelDenoiser.generate``, which places its conditioning with
:func:`for_unet` (the UNet's device and dtype: float16 conditioning for a float16 UNet, whatever the text
encoder produced). Anything sent from one rank to another as a pickled object carries host tensors
(:func:`for_transport`) and is placed by the receiver: a pickled CUDA tensor would be rebuilt on the
sender's device index, not the receiver's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Conditioning


@dataclass(frozen=True)
class Placement:
    """A rank's device and the dtype of its UNet's floating-point inputs."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of_unet(cls, unet, device: torch.device) -> "Placement":
        return cls(torch.device(device), unet.dtype)

    def tensor(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` on this device; floating-point values in this dtype, integers (token ids, indices) kept."""
        dtype = self.dtype if value.is_floating_point() else value.dtype
        return value.to(device=self.device, dtype=dtype)


def for_unet(cond: Conditioning, placement: Placement) -> Conditioning:
    """``cond`` with every tensor on the rank's device in the UNet's dtype (SDXL's time ids included)."""
    added = cond.added_cond_kwargs
    return Conditioning(placement.tensor(cond.prompt_embeds),
                        None if added is None else {k: placement.tensor(v) for k, v in added.items()})


def for_transport(cond: Conditioning | None) -> Conditioning | None:
    """``cond`` with host tensors (dtype kept), for a message to other ranks."""
    if cond is None:
        return None
    added = cond.added_cond_kwargs
    return Conditioning(cond.prompt_embeds.detach().cpu(),
                        None if added is None else {k: v.detach().cpu() for k, v in added.items()})


def tensors_in(value) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (tuples, lists, dicts, dataclasses such as ``Conditioning``)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if hasattr(value, "__dataclass_fields__"):
        return [t for name in value.__dataclass_fields__ for t in tensors_in(getattr(value, name))]
    return []


def check_transportable(message) -> None:
    """Refuses a message to other ranks that holds a tensor off the host (the protocol carries host tensors)."""
    stray = [str(t.device) for t in tensors_in(message) if t.device.type != "cpu"]
    if stray:
        raise ValueError(f"a message between ranks must carry host tensors; found tensors on {', '.join(stray)}")
