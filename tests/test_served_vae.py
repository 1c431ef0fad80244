"""The served patch-parallel VAE (the default at N > 1): the denoiser's rank group decodes the image, every
rank its latent slab, so the ensemble passes an image and the repository has no single-device decoder.

One real tritonserver with the default tiny-model settings (2 CPU ranks). The image the group decodes
is checked against one device decoding the same latents (what ``parallel_vae false`` serves), and the
pipeline's image against that image."""

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tritonclient.utils import InferenceServerException

from conftest import TINY_SIZE, group_restarts, relative_l2, tiny_serving_settings
from python_backend.client import generate
from python_backend.client.request import request_tensors
from python_backend.core.model import load_vae, to_uint8, vae_decode
from python_backend.serving.repository import serve_repository

pytestmark = pytest.mark.slow  # one server start with a two-rank group: about a minute on 2 cores

PROMPT, SEED, STEPS = "a blue square on a yellow background", 11, 2


def _infer(client, model, named_arrays, outputs=None):
    inputs = []
    for name, array, dtype in named_arrays:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    requested = None if outputs is None else [grpcclient.InferRequestedOutput(name) for name in outputs]
    return client.infer(model, inputs, outputs=requested)


def test_the_rank_group_decodes_and_the_image_equals_one_device_decoding(tiny_sdxl, tmp_path):
    settings = tiny_serving_settings(tiny_sdxl, default_steps=STEPS)
    assert settings.decodes_on_ranks, "N > 1 decodes on the ranks by default"
    with serve_repository(settings, tmp_path) as server:
        assert sorted(p.name for p in (tmp_path / "repository").iterdir()) == \
            ["denoiser", "pipeline", "pipeline_stream", "postprocess", "text_encoder"]
        client = grpcclient.InferenceServerClient(server.urls["grpc"])
        try:
            assert not client.is_model_ready("vae_decoder")
            outputs = {o.name for o in client.get_model_metadata("denoiser").outputs}
            assert outputs == {"latents", "decoded"}
            # bad input for the decoding denoiser is refused before any rank works; the group stays whole
            with pytest.raises(InferenceServerException, match="prompt_embeds"):
                _infer(client, "denoiser", [("prompt_embeds", np.full((1, 77, 64), np.nan, np.float32), "FP32")],
                       ["decoded"])
            with pytest.raises(InferenceServerException, match="vae_decoder"):
                _infer(client, "vae_decoder", [("latents", np.zeros((1, 4, 16, 16), np.float32), "FP32")])
            image = generate(server.urls["http"], PROMPT, seed=SEED)
            assert group_restarts(server) == 0

            # the denoiser itself, asked for both: the latents and the image the group decoded from them
            encoded = _infer(client, "text_encoder", request_tensors(PROMPT, seed=SEED))
            conditioning = [(name, encoded.as_numpy(name), "FP32") for name in ("prompt_embeds", "text_embeds",
                                                                                "time_ids")]
            seed = [("seed", np.array([SEED], dtype=np.int64), "INT64")]
            both = _infer(client, "denoiser", conditioning + seed, ["latents", "decoded"])
            latents_only = _infer(client, "denoiser", conditioning + seed, ["latents"])
        finally:
            client.close()

    latents, decoded = both.as_numpy("latents"), both.as_numpy("decoded")
    assert decoded.shape == (1, 3, TINY_SIZE, TINY_SIZE) and decoded.dtype == np.float32
    assert latents_only.as_numpy("decoded") is None  # not asked for: not decoded, not sent
    np.testing.assert_array_equal(latents_only.as_numpy("latents"), latents)
    one_device = vae_decode(load_vae(tiny_sdxl, torch.device("cpu")), torch.from_numpy(latents.copy()))
    error = relative_l2(torch.from_numpy(decoded), one_device)
    print(f"served patch-parallel decode vs one device: relative error {error:.2e}")
    assert error < 1e-5
    # the pipeline's image is the group's decode of the same generation, post-processed
    np.testing.assert_array_equal(image, to_uint8(torch.from_numpy(decoded))[0])
    assert np.abs(image.astype(int) - to_uint8(one_device)[0].astype(int)).max() <= 1
