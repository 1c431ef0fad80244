import pytest

from python_backend.core.layout import LayoutError, PatchLayout


def test_equal_split():
    layout = PatchLayout.split(64, 4, 4)
    assert layout.units == (4, 4, 4, 4)
    assert layout.latent_height == 64


def test_unequal_split_puts_extra_units_first():
    layout = PatchLayout.split(64, 3, 4, index=2)
    assert layout.units == (6, 5, 5)
    assert layout.scaled(5 * 4) == [24, 20, 20]  # latent rows
    assert layout.scaled(5) == [6, 5, 5]  # rows at the 4x downsampled level
    assert layout.row_range(64) == (44, 64)
    assert layout.row_range(16) == (11, 16)


def test_weights_sum_to_one():
    weights = PatchLayout.split(40, 3, 4).weights()
    assert weights == [4 / 10, 3 / 10, 3 / 10]


def test_too_many_patches_names_the_limit():
    with pytest.raises(LayoutError, match="at most 4 patches"):
        PatchLayout.split(16, 5, 4)


def test_height_must_split_on_whole_units():
    with pytest.raises(LayoutError, match="multiple of the UNet's downsampling factor 8"):
        PatchLayout.split(36, 2, 8)
