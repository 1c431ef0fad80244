"""Patch-parallel VAE decoding through real process groups: each rank decodes its latent slab (halo rows,
whole-map GroupNorm, mid-block attention over every slab) and the gathered image equals one device's."""

import pytest
import torch

from conftest import relative_l2
from python_backend.core.layout import LayoutError
from python_backend.core.model import vae_decode
from python_backend.core.patch_vae import ParallelVaeDecoder, decoder_layout
from python_backend.core.ranks import run_on_ranks

LATENT_ROWS, LATENT_COLUMNS = 16, 12  # 128x96 images: 3 ranks get unequal slabs (6, 5, 5 rows), 8 ranks 2 each


def _latents(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, LATENT_ROWS, LATENT_COLUMNS, generator=torch.Generator().manual_seed(seed))


def _load_vae(model: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model, subfolder="vae").eval()


def _decode_on_ranks(ranks, models: list[str], latents: torch.Tensor) -> list[torch.Tensor]:
    """Every rank decodes with every model; rank 0's images come back."""
    import torch.distributed as dist

    group = dist.group.WORLD if ranks.world_size > 1 else None
    images = []
    for model in models:
        decoder = ParallelVaeDecoder(_load_vae(model), group, ranks.rank, ranks.world_size)
        images.append(decoder.decode(latents))
        # one pass, nothing read stale: no layer's gathered rows outlive the decode (memory per rank)
        assert decoder.exchange.held_keys == []
    return images


@pytest.fixture(scope="module")
def single_device(tiny_sdxl, tiny_sd15):
    latents = _latents(0)
    return latents, [vae_decode(_load_vae(str(m)), latents) for m in (tiny_sdxl, tiny_sd15)]


@pytest.mark.parametrize("ranks", [2, 3, 8])  # 3: an interior slab and unequal slabs; 8: two latent rows each
def test_parallel_decoding_equals_one_device(ranks, single_device, tiny_sdxl, tiny_sd15):
    latents, expected = single_device
    decoded = run_on_ranks(ranks, _decode_on_ranks, ([str(tiny_sdxl), str(tiny_sd15)], latents))
    for family, image, reference in zip(("sdxl", "sd15"), decoded, expected):
        assert image.shape == reference.shape
        error = relative_l2(image, reference)
        print(f"{family} VAE at N = {ranks}: relative error {error:.2e}")
        assert error <= 1e-5, f"{family} VAE at N = {ranks}: relative error {error:.2e}"


def test_a_decoder_with_broken_borders_is_caught(single_device, tiny_sdxl):
    """The comparison above can fail: two slabs decoded alone (each with zero borders) differ visibly."""
    latents, expected = single_device
    vae = _load_vae(str(tiny_sdxl))
    halves = [vae_decode(vae, latents[:, :, :8]), vae_decode(vae, latents[:, :, 8:])]
    assert relative_l2(torch.cat(halves, dim=2), expected[0]) > 1e-3


def test_a_latent_too_short_for_the_ranks_is_refused_naming_the_limit():
    with pytest.raises(LayoutError, match="at most 4 patches"):
        decoder_layout(latent_height=4, num_patches=8, index=0)
    assert decoder_layout(latent_height=16, num_patches=3, index=0).units == (6, 5, 5)


def test_generate_decodes_on_every_rank_by_default_and_matches_one_device(tiny_sdxl, tmp_path):
    """``distrifusion generate --ranks 2``: the same latents, and an image within one level of rank 0's
    single-device decoding (float32 rounding may flip a pixel's last bit), with and without the option."""
    import numpy as np
    from PIL import Image

    from python_backend.cli import main

    outputs = {}
    for option in ("--parallel-vae", "--no-parallel-vae"):
        image, latents = tmp_path / f"{option}.png", tmp_path / f"{option}.npy"
        code = main(["generate", "--model", str(tiny_sdxl), "--prompt", "a red circle", "--height", "128",
                     "--width", "64", "--steps", "2", "--ranks", "2", "--no-split-cfg", "--seed", "5",
                     "--out", str(image), "--latents-out", str(latents), option])
        assert code == 0
        outputs[option] = (np.asarray(Image.open(image)).astype(int), np.load(latents))
    (parallel, parallel_latents), (single, single_latents) = outputs["--parallel-vae"], outputs["--no-parallel-vae"]
    np.testing.assert_array_equal(parallel_latents, single_latents)
    assert parallel.shape == single.shape == (128, 64, 3)
    assert np.abs(parallel - single).max() <= 1
