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


def test_the_workspace_hands_one_tensor_per_purpose_and_shape_and_releases_the_unasked():
    from python_backend.core.workspace import Workspace

    workspace = Workspace()
    parts = [torch.randn(2, 3, 4), torch.randn(2, 5, 4)]
    first = workspace.concatenated("keys and values", parts, dim=1)
    assert torch.equal(first, torch.cat(parts, dim=1))
    again = workspace.concatenated("keys and values", [p + 1 for p in parts], dim=1)
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, torch.cat(parts, dim=1) + 1)
    assert workspace.concatenated("halo frame", parts, dim=1).data_ptr() != first.data_ptr()
    assert workspace.concatenated("keys and values", [p.half() for p in parts], dim=1).dtype == torch.float16
    workspace.release_unasked()  # everything was asked for since the last release: kept
    held = workspace.nbytes
    workspace.concatenated("keys and values", parts, dim=1)
    workspace.release_unasked()  # the halo frame and the float16 tensor were not: released
    assert workspace.nbytes == 2 * 8 * 4 * 4 < held


def _workspace_job(ranks, model):
    """Two copies of the tiny UNet patched as this rank's slab of 2, one concatenating into the context's
    workspace and one into fresh tensors, through four steps (one synchronous, three asynchronous, each
    with another latent); the outputs, the allocations of concatenations in the last step, and how many
    concatenations the patch layers make in a step (one per self-attention and per halo convolution)."""
    import torch.distributed as dist

    from python_backend.core.patch_layers import PatchConv2d, PatchSelfAttentionProcessor
    from python_backend.core.workspace import Workspace
    from test_exchange import _AllocationCounter

    outputs, cat_allocations = {}, {}
    for name, workspace in (("workspace", Workspace()), ("fresh", None)):
        pipe = load_pipeline(model, torch.device("cpu"))
        layout = PatchLayout.split(16, 2, 4, ranks.rank)
        context = PatchContext(layout, BufferExchange(dist.group.WORLD, ranks.rank, 2), workspace=workspace)
        patch_unet(pipe.unet, context)
        context.begin_generation()
        _, text, added = _unet_inputs(pipe)
        outputs[name] = []
        with torch.no_grad():
            for step in range(4):
                context.begin_step(step)
                sample, _, _ = _unet_inputs(pipe, seed=step)
                with _AllocationCounter() as counter:
                    outputs[name].append(pipe.unet(sample, 900 - 200 * step, encoder_hidden_states=text,
                                                   added_cond_kwargs=added).sample)
            cat_allocations[name] = [a for a in counter.allocations if "cat" in a]
        context.end_generation()
    layer_concatenations = sum(isinstance(m, PatchConv2d) or isinstance(getattr(m, "processor", None),
                                                                        PatchSelfAttentionProcessor)
                               for m in pipe.unet.modules())
    return outputs, cat_allocations, layer_concatenations


def test_concatenating_into_the_workspace_changes_no_value_and_allocates_no_concatenation(tiny_sdxl):
    """The gathered keys and values and the halo frames reuse one tensor per shape, layer after layer and
    step after step; a reader that still needed an earlier layer's would see this one's values instead."""
    from python_backend.core.ranks import run_on_ranks

    outputs, cat_allocations, layer_concatenations = run_on_ranks(2, _workspace_job, (str(tiny_sdxl),))
    for step, (got, expected) in enumerate(zip(outputs["workspace"], outputs["fresh"])):
        assert torch.equal(got, expected), step
    assert layer_concatenations > 10
    # what still allocates is the UNet's own (skip connections, embeddings) and the published halo rows
    assert len(cat_allocations["fresh"]) - len(cat_allocations["workspace"]) == layer_concatenations
