"""Triton model ``vae_decoder``: final latents -> the VAE's image [B, 3, H, W] in [-1, 1]."""

from __future__ import annotations

import torch

from ..core.model import load_vae, vae_decode
from ..core.devices import resolve_device_kind
from . import triton_io, validation
from .settings import ServingSettings, cpu_threads


class TritonPythonModel:
    def initialize(self, args):
        self.settings = settings = ServingSettings.from_model_config(args["model_config"])
        self.shapes = validation.TensorShapes.read(settings.model_dir)
        cpu_threads(settings)
        device = resolve_device_kind(settings.device)
        self.vae = load_vae(settings.model_dir, torch.device(device))
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for height, width in settings.built_sizes:  # warm-up: the first request pays no first call's costs
            vae_decode(self.vae, torch.zeros(1, self.vae.config.latent_channels, height // factor, width // factor))

    def execute(self, requests):
        def decode(request):
            # a built size only: a client asking for a 2048^2 decode stalls every pipeline request
            latents = torch.from_numpy(validation.latents(triton_io.tensor(request, "latents"), self.settings,
                                                          self.shapes))
            return {"decoded": vae_decode(self.vae, latents).float().cpu().numpy()}

        return triton_io.answer_each(requests, decode, self.settings.max_request_id_chars)

    def finalize(self):
        triton_io.log_finalized("vae_decoder")
