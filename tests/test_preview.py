"""The latent preview (core/preview.py): a fixed latent-to-RGB map fitted per VAE, against what the VAE
encoded, on the trained embedded model's VAE (whose latents carry colours) and a random one."""

import numpy as np
import pytest
import torch

from python_backend.core.model import load_vae, scale_latents, unscale_latents
from python_backend.core.preview import LatentPreview, fit_latent_preview
from python_backend.embedded import shapes, training


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    from python_backend.embedded.tiny_model import write_trained_sdxl

    return load_vae(write_trained_sdxl(tmp_path_factory.mktemp("trained")), torch.device("cpu"))


def _encoded(vae, image: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        return scale_latents(vae, vae.encode(pixels).latent_dist.mean)


def test_a_preview_of_a_scenes_latents_shows_the_scene_at_latent_resolution(trained_vae):
    """The trained tiny VAE's latents are far from linear in colour (its GroupNorm normalises each whole
    scene), so a linear preview is rough: 26.8 % of full scale per pixel on these scenes, against 32.8 %
    for a flat grey picture (the previous VAE's latents gave 13 %). A map with its channels in the wrong
    order, as a transposed or misread map would have them, must do worse than the fitted one."""
    preview = fit_latent_preview(trained_vae)
    misread = LatentPreview(np.concatenate([preview.weights[:, -2::-1], preview.weights[:, -1:]], axis=1))
    errors, misread_errors, grey = [], [], []
    for spec in training.held_out_specs(12):
        image = shapes.render(spec, 256)
        latents = _encoded(trained_vae, image)
        shown = preview.to_rgb(latents)
        assert shown.shape == (32, 32, 3) and shown.dtype == np.uint8
        small = image.reshape(32, 8, 32, 8, 3).mean(axis=(1, 3))
        errors.append(np.abs(shown.astype(float) - small).mean() / 255)
        misread_errors.append(np.abs(misread.to_rgb(latents).astype(float) - small).mean() / 255)
        grey.append(np.abs(127.5 - small).mean() / 255)
    print(f"\nmean absolute preview error over 12 scenes: {np.mean(errors):.3f} of full scale "
          f"(channels reversed: {np.mean(misread_errors):.3f}, a flat grey picture: {np.mean(grey):.3f})")
    assert np.mean(errors) < 0.9 * np.mean(grey)
    assert np.mean(errors) < 0.9 * np.mean(misread_errors)


def test_scaling_round_trips_and_the_map_checks_its_input():
    class Config:
        scaling_factor, latents_mean, latents_std = 0.5, [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]

    class Vae:
        config = Config()

    latents = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(unscale_latents(Vae(), scale_latents(Vae(), latents)), latents)
    preview = LatentPreview(np.zeros((3, 5), np.float32))
    assert (preview.to_rgb(np.zeros((1, 4, 2, 2), np.float32)) == 128).all()  # 0 in [-1, 1] is mid grey
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, h, w\], got \[1, 3, 2, 2\]"):
        preview.to_rgb(np.zeros((1, 3, 2, 2), np.float32))
