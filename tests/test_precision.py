"""Half precision on the served path, on CPU standing in for the GPU's: the UNet in float16 and in
bfloat16 behind the real tritonserver at N = 1 and N = 2, fed the text encoder's float32 conditioning.
And the placement rule every entry goes through (``core.placement``), on a second device name."""

import numpy as np
import pytest
import torch

from conftest import TINY_SIZE as SIZE, reference_image, served_image_twice, tiny_serving_settings
from python_backend.core.model import Conditioning
from python_backend.core.placement import Placement, check_transportable, for_transport, for_unet

STEPS, SEED, PROMPT = 3, 11, "a lighthouse on a cliff at dusk"
# Mean absolute difference (levels of 255) of the half-precision image from the float32 one. Measured on
# the tiny model at 128x128, 3 steps: float16 0.16, bfloat16 1.12 (its 8-bit mantissa), at N = 1 and 2.
TOLERANCE = {"float16": 1.0, "bfloat16": 4.0}


def _cond(device="cpu", dtype=torch.float32):
    return Conditioning(torch.ones(2, 77, 64, device=device, dtype=dtype),
                        {"text_embeds": torch.ones(2, 32, device=device, dtype=dtype),
                         "time_ids": torch.ones(2, 6, device=device, dtype=dtype)})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conditioning_is_placed_on_the_ranks_device_in_the_unets_dtype(dtype):
    placed = for_unet(_cond(), Placement(torch.device("meta"), dtype))  # meta: "another device"
    for tensor in (placed.prompt_embeds, *placed.added_cond_kwargs.values()):
        assert tensor.device.type == "meta" and tensor.dtype == dtype
    ids = Placement(torch.device("meta"), dtype).tensor(torch.arange(3))
    assert ids.dtype == torch.int64  # integers are moved, never cast


def test_messages_between_ranks_carry_host_tensors_only():
    sent = for_transport(for_unet(_cond(), Placement(torch.device("cpu"), torch.float16)))
    check_transportable(("request", sent))
    assert sent.prompt_embeds.dtype == torch.float16  # dtype kept: the receiver places it
    with pytest.raises(ValueError, match="host tensors; found tensors on meta"):
        check_transportable(("request", _cond(device="meta")))


@pytest.fixture(scope="module")
def float32_image(tiny_sdxl):
    return reference_image(tiny_sdxl, PROMPT, SEED, STEPS)


@pytest.mark.slow
# each dtype once, each rank count once: the placement rule itself is tested for both dtypes above
@pytest.mark.parametrize("dtype, ranks", [("float16", 2), ("bfloat16", 1)])
def test_served_half_precision_unet_gives_the_float32_image_within_tolerance(tiny_sdxl, tmp_path, float32_image,
                                                                             dtype, ranks):
    # the default layout: the CFG halves split over the 2 ranks
    settings = tiny_serving_settings(tiny_sdxl, ranks=ranks, split_cfg=True, dtype=dtype, warmup_steps=1,
                                     default_steps=STEPS)
    image, again, restarts = served_image_twice(settings, tmp_path, PROMPT, SEED)
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
    np.testing.assert_array_equal(image, again)
    difference = float(np.abs(image.astype(np.float64) - float32_image).mean())
    print(f"\n{dtype} at N = {ranks}: mean |image - float32 image| = {difference:.3f} levels")
    assert 0 < difference < TOLERANCE[dtype]  # 0 would mean the dtype was not used
    assert restarts == 0
