"""Triton model ``postprocess``: the VAE's image -> uint8 [H, W, 3] (the first image of the batch)."""

from __future__ import annotations

import torch

from ..core.model import to_uint8
from . import triton_io, validation
from .settings import ServingSettings


class TritonPythonModel:
    def initialize(self, args):
        self.settings = ServingSettings.from_model_config(args["model_config"])
        to_uint8(torch.zeros(1, 3, 8, 8))  # warm-up (imports the image processor): not the first request's cost

    def execute(self, requests):
        def convert(request):
            return {"image": to_uint8(torch.from_numpy(validation.decoded(triton_io.tensor(request, "decoded"),
                                                                           self.settings)))[0]}

        return triton_io.answer_each(requests, convert, self.settings.max_request_id_chars)

    def finalize(self):
        triton_io.log_finalized("postprocess")
