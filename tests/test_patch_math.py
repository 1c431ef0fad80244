"""The patch math alone: slab-wise results equal whole-map results when the others' data is fresh."""

import pytest
import torch

from python_backend.core import patch_math
from python_backend.core.layout import PatchLayout


def _slabs(x, layout):
    return [x[:, :, slice(*PatchLayout(layout.units, layout.unit_rows, r).row_range(x.shape[2]))]
            for r in range(layout.num_patches)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("units", [(2, 2), (3, 2, 1), (1, 1, 1, 1)])
def test_halo_conv_equals_full_conv(stride, units):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    layout = PatchLayout(units, 4)
    x = torch.randn(2, 3, 4 * sum(units), 12)
    halo = patch_math.Halo.of(conv)
    slabs = _slabs(x, layout)
    payloads = [patch_math.halo_payload(s, halo) for s in slabs]
    outputs = []
    for r, slab in enumerate(slabs):
        above, below = patch_math.neighbour_rows(payloads, r, halo, slab)
        outputs.append(patch_math.conv_rows(conv, torch.cat([above, slab, below], dim=2)))
    torch.testing.assert_close(torch.cat(outputs, dim=2), conv(x), rtol=1e-5, atol=1e-5)


def test_sliced_input_equals_full_conv_rows():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 16, 8)
    halo = patch_math.Halo.of(conv)
    out = patch_math.conv_rows(conv, patch_math.slice_with_halo(x, 4, 10, halo))
    torch.testing.assert_close(out, conv(x)[:, :, 4:10], rtol=1e-5, atol=1e-5)


def test_group_moments_combine_to_torch_group_norm():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    norm.weight.data.uniform_(0.5, 1.5)
    norm.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 8, 12, 6) * 2 + 0.5
    layout = PatchLayout((3, 2, 1), 2)
    slabs = _slabs(x, layout)
    moments = patch_math.weighted_sum(torch.tensor(layout.weights()),
                                      torch.stack([patch_math.group_moments(s, 4) for s in slabs]))
    # the synchronous steps' form (a list and Python floats, what torch.export can trace) agrees
    torch.testing.assert_close(patch_math.weighted_moments([patch_math.group_moments(s, 4) for s in slabs],
                                                           layout.weights()), moments)
    var = patch_math.variance(moments)
    out = torch.cat([patch_math.group_normalize(s, norm, moments[0], var) for s in slabs], dim=2)
    torch.testing.assert_close(out, norm(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_group_normalize_in_half_precision_matches_torch_in_float32(dtype, affine):
    # the scale and shift are folded in float32: a half-precision slab comes out within its own rounding
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8, affine=affine)
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-1, 1)
    x = (torch.randn(2, 8, 6, 5) * 3 + 4).to(dtype)
    moments = patch_math.group_moments(x, 4)
    out = patch_math.group_normalize(x, norm.to(dtype), moments[0], patch_math.variance(moments))
    assert out.dtype == dtype
    expected = torch.nn.functional.group_norm(x.float(), 4, norm.weight.float() if affine else None,
                                              norm.bias.float() if affine else None, norm.eps)
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.02 if dtype is torch.bfloat16 else 0.003)


def test_corrected_moments_shift_stale_global_by_local_change():
    stale = torch.stack([torch.full((2, 1, 1), v) for v in (1.0, 3.0)])
    fresh = torch.full((2, 1, 1), 2.0)
    corrected = patch_math.corrected_moments(stale, fresh, 0, torch.tensor([0.5, 0.5]))
    # stale global 2.0, plus the local change 2.0 - 1.0 (not weighted)
    assert torch.allclose(corrected, torch.full((2, 1, 1), 3.0))


def test_the_within_slab_variance_bounds_the_whole_maps_variance_from_below():
    torch.manual_seed(0)
    layout = PatchLayout((3, 2, 1), 2)
    x = torch.randn(2, 8, 12, 6)
    x[:, :, :6] += 3.0  # slab means far apart: the whole variance is well above the slabs' own
    weights = torch.tensor(layout.weights())
    slabs = [patch_math.group_moments(s, 4) for s in _slabs(x, layout)]
    whole = patch_math.variance(patch_math.weighted_sum(weights, torch.stack(slabs)))
    floor = patch_math.within_slab_variance(torch.stack(slabs), weights)
    assert (floor <= whole + 1e-5).all() and (floor < 0.5 * whole).all()
    same = torch.randn(2, 8, 12, 6)  # every slab the same statistics: the bound is nearly tight
    slabs = [patch_math.group_moments(s, 4) for s in _slabs(same, layout)]
    whole = patch_math.variance(patch_math.weighted_sum(weights, torch.stack(slabs)))
    torch.testing.assert_close(patch_math.within_slab_variance(torch.stack(slabs), weights), whole, rtol=0.1, atol=0)


def test_a_cancelled_variance_is_lifted_to_the_floor_and_a_plausible_one_left_alone():
    cancelled = torch.tensor([[[2.0]], [[4.0001]]])  # E[x^2] - E[x]^2 = 1e-4: would multiply activations by ~100
    plausible = torch.tensor([[[2.0]], [[7.0]]])  # variance 3
    floor = torch.tensor([[1.5]])
    local = torch.tensor([[[1.0]], [[3.0]]])  # the slab's own variance: 2
    assert patch_math.corrected_variance(cancelled, local, floor).item() == pytest.approx(1.5)
    assert patch_math.corrected_variance(plausible, local, floor).item() == pytest.approx(3.0)
    assert patch_math.variance(cancelled).item() == pytest.approx(1e-4, rel=1e-2)


def test_a_negative_corrected_variance_takes_the_slabs_own():
    negative = torch.tensor([[[2.0]], [[1.0]]])  # E[x]^2 > E[x^2]
    local = torch.tensor([[[1.0]], [[3.0]]])
    assert patch_math.corrected_variance(negative, local, floor=torch.tensor([[1.5]])).item() == pytest.approx(2.0)
    assert patch_math.corrected_variance(negative, local, floor=torch.zeros(1, 1)).item() == pytest.approx(2.0)
    assert patch_math.variance(local).item() == pytest.approx(2.0)


def test_local_queries_over_full_keys_equal_full_attention_rows():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, 16) for _ in range(3))
    full = patch_math.attention(q, k, v, heads=4)
    part = patch_math.attention(q[:, 8:20], k, v, heads=4)
    torch.testing.assert_close(part, full[:, 8:20], rtol=1e-5, atol=1e-6)
