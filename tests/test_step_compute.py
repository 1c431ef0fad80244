"""Less compute per step: the self-attention's key and value projections as one product, and the
cross-attention's text keys and values computed once per generation."""

import pytest
import torch
from torch import nn

from conftest import relative_l2
from python_backend.core.context import PatchContext
from python_backend.core.exchange import BufferExchange
from python_backend.core.layout import PatchLayout
from python_backend.core.model import load_pipeline
from python_backend.core.patch_layers import FusedKeyValue, patch_unet


class _Projections(nn.Module):
    def __init__(self, bias_k: bool, bias_v: bool):
        super().__init__()
        self.to_k = nn.Linear(8, 6, bias=bias_k)
        self.to_v = nn.Linear(8, 6, bias=bias_v)


@pytest.mark.parametrize("bias_k, bias_v", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_key_value_equals_the_two_projections_and_follows_a_dtype_change(bias_k, bias_v, dtype):
    torch.manual_seed(0)
    layer = _Projections(bias_k, bias_v)
    fused = FusedKeyValue()
    x = torch.randn(2, 5, 8)
    assert torch.allclose(fused(layer, x), torch.cat([layer.to_k(x), layer.to_v(x)], dim=-1), atol=1e-6)
    layer.to(dtype)  # a model moved or cast after patching: the fused weight is made again
    x = x.to(dtype)
    got = fused(layer, x)
    assert got.dtype == dtype
    assert torch.allclose(got.float(), torch.cat([layer.to_k(x), layer.to_v(x)], dim=-1).float(), atol=1e-2)
    with torch.no_grad():
        layer.to_v.weight.mul_(2)  # weights changed in place (a reload): remade too
    assert torch.allclose(fused(layer, x).float(), torch.cat([layer.to_k(x), layer.to_v(x)], dim=-1).float(), atol=1e-2)


def _cross_attention_key_calls(unet) -> list[int]:
    from diffusers.models.attention_processor import Attention

    calls = [0]
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.to_k.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _unet_inputs(pipe, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = pipe.unet.config
    sample = torch.randn(batch, config.in_channels, 16, 16, generator=generator)
    text = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(batch, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim, generator=generator),
             "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * batch)}
    return sample, text, added


def test_cross_attention_keys_are_computed_once_per_generation_and_the_output_is_unchanged(tiny_sdxl):
    reference_pipe = load_pipeline(tiny_sdxl, torch.device("cpu"))
    pipe = load_pipeline(tiny_sdxl, torch.device("cpu"))
    context = PatchContext(PatchLayout((1,), 4), BufferExchange(None, 0, 1))
    patch_unet(pipe.unet, context)
    layers = sum(1 for m in pipe.unet.modules() if getattr(m, "is_cross_attention", False))
    calls = _cross_attention_key_calls(pipe.unet)
    sample, text, added = _unet_inputs(pipe)
    with torch.no_grad():
        for generation in range(2):
            context.begin_generation()
            for step, t in enumerate((900, 500, 100)):
                context.begin_step(step)
                got = pipe.unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
                expected = reference_pipe.unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
                assert relative_l2(got, expected) < 1e-5, (generation, step)
            assert calls[0] == layers * (generation + 1), "the text keys were computed more than once a generation"
        # other conditioning in the same generation (another request's text): computed again, and right
        other = text.flip(0).clone()
        got = pipe.unet(sample, 500, encoder_hidden_states=other, added_cond_kwargs=added).sample
        expected = reference_pipe.unet(sample, 500, encoder_hidden_states=other, added_cond_kwargs=added).sample
        assert calls[0] == layers * 3
        assert relative_l2(got, expected) < 1e-5
