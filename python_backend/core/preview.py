"""A cheap preview of the denoiser's current latents: a fixed linear map from latent channels to RGB.

Decoding every few steps with the VAE would cost a decode each time (at 1024² the slowest single step
of a request); a preview only has to show the layout and colours forming. The map is fitted once per
VAE: solid-colour images are encoded, and least squares finds the affine map from their (denoiser-scale)
latents back to the colours. It is exact for nothing and good enough to watch an image appear; the
preview is at latent resolution (1/8 of the image side for Stable Diffusion VAEs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .model import scale_latents

# The fitting colours: black, white, greys, primaries and secondaries, and seeded random ones, in [0, 1].
_FIT_COLOURS = np.concatenate([np.array([
    [0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75],
    [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1],
], dtype=np.float32), np.random.default_rng(0).random((53, 3), dtype=np.float32)])
_FIT_SIDE = 64


@dataclass(frozen=True)
class LatentPreview:
    """``rgb = weights @ [latent channels..., 1]`` per pixel, in [-1, 1] (the VAE's image range)."""

    weights: np.ndarray  # float32 [3, C + 1]

    @property
    def channels(self) -> int:
        return self.weights.shape[1] - 1

    def to_rgb(self, latents: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 [h, w, 3] of the first image of ``latents`` [B, C, h, w] (denoiser scale)."""
        array = latents.detach().float().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
        if array.ndim != 4 or array.shape[1] != self.channels:
            raise ValueError(f"latents must be [B, {self.channels}, h, w], got {list(array.shape)}")
        first = array[0].astype(np.float32)
        rgb = np.einsum("kc,chw->hwk", self.weights[:, :-1], first) + self.weights[:, -1]
        return np.clip(np.rint((rgb + 1.0) * 127.5), 0, 255).astype(np.uint8)


@torch.no_grad()
def fit_latent_preview(vae) -> LatentPreview:
    """The preview map of ``vae`` (an ``AutoencoderKL``), fitted on encoded solid colours."""
    parameter = next(vae.parameters())
    images = torch.from_numpy(_FIT_COLOURS).view(-1, 3, 1, 1).expand(-1, 3, _FIT_SIDE, _FIT_SIDE) * 2.0 - 1.0
    means = vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist.mean.float().cpu()
    latents = scale_latents(vae, means)
    # the middle of each latent image: the borders see the encoder's zero padding, not the colour
    h, w = latents.shape[-2:]
    middle = latents[:, :, h // 4: h - h // 4, w // 4: w - w // 4].mean(dim=(2, 3)).numpy()
    design = np.concatenate([middle, np.ones((len(middle), 1), np.float32)], axis=1)  # [K, C + 1]
    targets = _FIT_COLOURS * 2.0 - 1.0  # [K, 3]
    ridge = 1e-3 * np.eye(design.shape[1], dtype=np.float32)
    weights = np.linalg.solve(design.T @ design + ridge, design.T @ targets).T
    return LatentPreview(weights.astype(np.float32))
