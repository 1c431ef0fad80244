"""Segment engines on ONNX Runtime against the eager core, the exports, and the build cache."""

import dataclasses
import logging
import shutil

import onnx
import pytest

from conftest import relative_l2
from python_backend.engines.build import BuildRequest, build, cache_key
from python_backend.core.denoise import GenerationRequest
from python_backend.core.parallel import ParallelConfig
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.modes import Mode
from python_backend.core.ranks import run_on_ranks

REQUEST = GenerationRequest("a photo of an astronaut", height=256, width=128, steps=6, guidance=5.0, seed=7)
WARMUP = 2


def _counting_job(ranks, job):
    """``run_generation_job`` that also counts this rank's ONNX Runtime session runs."""
    from python_backend.engines import runners

    calls = []
    original = runners.OnnxRuntimeRunner.run

    def counted(self, feeds):
        calls.append(1)
        return original(self, feeds)

    runners.OnnxRuntimeRunner.run = counted
    try:
        (output,) = run_generation_job(ranks, job)
    finally:
        runners.OnnxRuntimeRunner.run = original
    return output, len(calls)


def _latents(model, world_size, engine, folder, mode):
    job = GenerationJob(str(model), [(REQUEST, ParallelConfig(mode, WARMUP, split_cfg=False))], decode=False,
                        progress=False, engine=engine, engine_dir=None if folder is None else str(folder))
    return run_on_ranks(world_size, _counting_job, (job,))


# N = 3: both edge slabs, an interior slab (halos from both sides) and unequal slabs (3, 3, 2 units); N = 2
# engines against eager is test_sd15_layout_segments_on_onnxruntime's (the same code, another UNet layout)
@pytest.mark.parametrize("world_size", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_onnxruntime_equals_eager(tiny_sdxl, engine_root, world_size):
    import json

    request = BuildRequest(str(tiny_sdxl), REQUEST.height, REQUEST.width, world_size, split_cfg=False)
    folder = build(request, engine_root, progress=False)
    eager, eager_calls = _latents(tiny_sdxl, world_size, "torch", None, Mode.CORRECTED_ASYNC_GN)
    engines, engine_calls = _latents(tiny_sdxl, world_size, "onnxruntime", folder, Mode.CORRECTED_ASYNC_GN)
    # The engines really ran every asynchronous step: the time embedding and every segment, once each
    # per asynchronous step (the synchronous warm-up steps stay in the eager core), and the text keys and
    # values once per generation.
    segments = len(json.loads((folder / "patch0" / "manifest.json").read_text())["segments"])
    assert (eager_calls, engine_calls) == (0, (REQUEST.steps - WARMUP) * (1 + segments) + 1)
    error = relative_l2(engines.latents, eager.latents)
    assert error < 1e-4, f"N={world_size}: {error:.2e}"
    for path in folder.rglob("*.onnx"):
        onnx.checker.check_model(str(path))


def test_text_keys_and_values_follow_each_generations_prompt(tiny_sdxl, engine_root):
    """The text key/value graph's outputs are kept for a whole generation: a second generation with
    another prompt on the same loaded engines gives exactly what it gives on freshly loaded ones."""
    # one slab (what is cached does not depend on N), the build test_onnxruntime_equals_eager[1] made
    folder = build(BuildRequest(str(tiny_sdxl), REQUEST.height, REQUEST.width, 1, split_cfg=False), engine_root,
                   progress=False)
    first = dataclasses.replace(REQUEST, steps=4)
    second = dataclasses.replace(first, prompt="a red square at the bottom right", seed=3)
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 1, split_cfg=False)

    def job(requests):
        return GenerationJob(str(tiny_sdxl), [(r, parallel) for r in requests], decode=False, progress=False,
                             engine="onnxruntime", engine_dir=str(folder))

    after_another = run_on_ranks(1, run_generation_job, (job([first, second]),))
    alone = run_on_ranks(1, run_generation_job, (job([second]),))
    assert relative_l2(after_another[1].latents, alone[0].latents) < 1e-6
    assert relative_l2(after_another[0].latents, alone[0].latents) > 0.05  # the prompts do differ


def test_segment_names_are_stable(tiny_sdxl, engine_root):
    import json

    # the names do not depend on the size: the 128x128 build other tests use
    folder = build(BuildRequest(str(tiny_sdxl), 128, 128, 2, split_cfg=False), engine_root, progress=False)
    manifest = json.loads((folder / "patch1" / "manifest.json").read_text())
    names = [s["name"] for s in manifest["segments"]]
    assert names == ["down0", "down1", "down2", "mid", "up0", "up1", "up2"]
    first = onnx.load(str(folder / "patch1" / manifest["segments"][0]["file"]), load_external_data=False)
    inputs = [i.name for i in first.graph.input]
    # down0 has no cross-attention, so "text" is not an input there (the exporter drops unused inputs)
    assert inputs[:2] == ["sample", "temb"] and all(n.startswith("stale.") for n in inputs[2:])
    second = onnx.load(str(folder / "patch1" / manifest["segments"][1]["file"]), load_external_data=False)
    second_inputs = [i.name for i in second.graph.input]
    # down1 has cross-attention: it reads each layer's text keys and values (made once per generation), not
    # the text
    assert second_inputs[:2] == ["hidden", "temb"] and "text" not in second_inputs
    layers = manifest["segments"][1]["text_kv"]
    assert layers and all(layer.startswith("down_blocks.1.") and layer.endswith("attn2") for layer in layers)
    assert second_inputs[-2 * len(layers):] == [f"text_{part}.{layer}" for layer in layers for part in ("key", "value")]
    assert [o.name for o in second.graph.output][0] == "hidden_out"
    text_kv = onnx.load(str(folder / "patch1" / manifest["text_kv"]["file"]), load_external_data=False)
    assert [i.name for i in text_kv.graph.input] == ["text"]
    every_layer = [layer for s in manifest["segments"] for layer in s["text_kv"]]
    assert manifest["text_kv"]["layers"] == every_layer
    assert [o.name for o in text_kv.graph.output] == [f"text_{p}.{layer}" for layer in every_layer for p in ("key", "value")]
    outputs = [o.name for o in first.graph.output]
    assert outputs[0] == "hidden" and any(n.startswith("skip") for n in outputs)
    assert any(n.startswith("fresh.") for n in outputs)


def test_second_build_is_a_cache_hit(tiny_sdxl, engine_root, caplog):
    request = BuildRequest(str(tiny_sdxl), 128, 128, 2, split_cfg=False)
    first = build(request, engine_root, progress=False)
    stamp = (first / "build.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="distrifusion.build"):
        second = build(request, engine_root, progress=False)
    assert second == first
    assert (first / "build.json").stat().st_mtime_ns == stamp
    assert "cache hit" in caplog.text


def test_changing_any_key_field_rebuilds(tiny_sdxl, engine_root, tmp_path):
    base = BuildRequest(str(tiny_sdxl), 128, 128, 2, split_cfg=False)
    key, _ = cache_key(base)
    changes = {"height": 256, "width": 256, "ranks": 4, "mode": "stale_gn", "precision": "fp16",
               "split_cfg": True, "num_images": 2, "cut": "down0+down1,down2,mid,up0,up1+up2", "parallel_vae": True}
    for field, value in changes.items():
        assert cache_key(dataclasses.replace(base, **{field: value}))[0] != key, field
    # New weights, same everything else: copy the model and change one byte of the UNet.
    copy = tmp_path / "model"
    shutil.copytree(tiny_sdxl, copy)
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert cache_key(dataclasses.replace(base, model=str(copy)))[0] != key
    # The VAE's weights matter only to a build that holds decoder pieces.
    vae = next((copy / "vae").glob("*.safetensors"))
    shutil.copy(next((tiny_sdxl / "unet").glob("*.safetensors")), weights)
    data = bytearray(vae.read_bytes())
    data[-1] ^= 1
    vae.write_bytes(bytes(data))
    assert cache_key(dataclasses.replace(base, model=str(copy)))[0] == key
    with_decoder = dataclasses.replace(base, parallel_vae=True)
    assert cache_key(dataclasses.replace(with_decoder, model=str(copy)))[0] != cache_key(with_decoder)[0]
    # And a real rebuild lands in a new folder.
    rebuilt = build(dataclasses.replace(base, cut="down0+down1,down2,mid,up0,up1+up2"), engine_root, progress=False)
    assert rebuilt != build(base, engine_root, progress=False)
    assert len(list(rebuilt.glob("patch0/*.onnx"))) == 1 + 5 + 1  # time embedding, 5 segments, text keys and values


def test_engines_refuse_a_generation_they_were_not_built_for(tiny_sdxl, engine_root):
    folder = build(BuildRequest(str(tiny_sdxl), 128, 128, 2, split_cfg=False), engine_root, progress=False)
    job = GenerationJob(str(tiny_sdxl), [(REQUEST, ParallelConfig(Mode.CORRECTED_ASYNC_GN, WARMUP, False))],
                        decode=False, progress=False, engine="onnxruntime", engine_dir=str(folder))
    with pytest.raises(Exception, match="were built for"):
        run_on_ranks(1, run_generation_job, (job,))


@pytest.mark.slow
def test_sd15_layout_segments_on_onnxruntime(tiny_sd15, engine_root):
    """SD 1.x: four levels, 1x1-conv projections, cross-attention in the first down block."""
    request = GenerationRequest("a watercolor fox", height=256, width=128, steps=5, guidance=6.0, seed=2)
    folder = build(BuildRequest(str(tiny_sd15), 256, 128, 2, split_cfg=False), engine_root, progress=False)
    outputs, calls = {}, {}
    for engine in ("torch", "onnxruntime"):
        job = GenerationJob(str(tiny_sd15), [(request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, False))],
                            decode=False, progress=False, engine=engine, engine_dir=str(folder))
        output, calls[engine] = run_on_ranks(2, _counting_job, (job,))
        outputs[engine] = output.latents
    # per asynchronous step the time embedding and 9 segments; the text keys and values once
    assert calls == {"torch": 0, "onnxruntime": (request.steps - 2) * (1 + 4 + 1 + 4) + 1}
    assert relative_l2(outputs["onnxruntime"], outputs["torch"]) < 1e-4
    assert len(list(folder.glob("patch1/segment_*.onnx"))) == 4 + 1 + 4
