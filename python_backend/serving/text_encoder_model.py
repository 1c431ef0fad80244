"""Triton model ``text_encoder``: prompt (+ negative prompt) -> the UNet's text conditioning."""

from __future__ import annotations

import numpy as np
import torch

from ..core.devices import resolve_device_kind, torch_dtype
from ..core.model import encode_prompt
from . import triton_io, validation
from .settings import ServingSettings, cpu_threads


class TritonPythonModel:
    def initialize(self, args):
        from diffusers import DiffusionPipeline

        self.settings = ServingSettings.from_model_config(args["model_config"])
        cpu_threads(self.settings)
        device = torch.device(resolve_device_kind(self.settings.device))
        # Only the tokenizers and text encoders are needed here.
        self.pipe = DiffusionPipeline.from_pretrained(
            self.settings.model_dir, unet=None, vae=None, local_files_only=True,
            dtype=torch_dtype("auto", device),
        ).to(device)
        with torch.no_grad():  # warm-up: the first request pays no first call's costs
            encode_prompt(self.pipe, "warm-up", None, 1, self.settings.default_guidance > 1,
                          self.settings.default_height, self.settings.default_width)

    def execute(self, requests):
        return triton_io.answer_each(requests, self._encode, self.settings.max_request_id_chars)

    def finalize(self):
        triton_io.log_finalized("text_encoder")

    def _encode(self, request) -> dict[str, np.ndarray]:
        s = self.settings
        prompt = validation.text("prompt", triton_io.optional_value(request, "prompt"), s, required=True)
        negative = validation.text("negative_prompt", triton_io.optional_value(request, "negative_prompt"), s,
                                   required=False)
        # Every option is checked here, before any work, though only some are used here.
        values = {name: triton_io.optional_value(request, name) for name in validation.OPTIONS}
        checked = validation.generation(values, s, prompt)
        guidance, height, width = checked.guidance, checked.height, checked.width
        with torch.no_grad():
            cond = encode_prompt(self.pipe, prompt, negative, 1, guidance > 1, height, width)
        batch = cond.prompt_embeds.shape[0]
        added = cond.added_cond_kwargs or {"text_embeds": torch.zeros(batch, 1), "time_ids": torch.zeros(batch, 1)}
        return {
            "prompt_embeds": cond.prompt_embeds.float().cpu().numpy(),
            "text_embeds": added["text_embeds"].float().cpu().numpy(),
            "time_ids": added["time_ids"].float().cpu().numpy(),
        }

