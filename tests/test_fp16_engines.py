"""Segments exported in half precision (what TensorRT builds strongly typed) with the GroupNorm moments in
float32 inside the graph, checked on CPU with ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch

from conftest import relative_l2
from python_backend.core import patch_math

pytestmark = pytest.mark.slow  # two builds (fp32, fp16) of 2 slabs: about a minute on 2 cores

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def builds(tiny_sdxl, engine_root):
    from python_backend.engines.build import BuildRequest, build

    return {precision: build(BuildRequest(str(tiny_sdxl), SIZE, SIZE, 2, precision=precision, split_cfg=False),
                             engine_root, progress=False)
            for precision in ("fp32", "fp16")}


def _graphs(folder):
    return sorted(folder.glob("patch*/*.onnx"))


def _elem_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return inferred, types


def test_fp16_graphs_take_half_inputs_and_reduce_moments_in_float32(builds):
    reductions = 0
    for path in _graphs(builds["fp16"]):
        model, types = _elem_types(onnx.load(str(path)))
        inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        for name in inputs:
            if name in ("sample", "hidden", "text") or name.startswith(("text_key.", "text_value.")):
                assert inputs[name] == onnx.TensorProto.FLOAT16, (path.name, name)
        producers = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type != "ReduceMean":
                continue
            reductions += 1
            assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, (path.name, node.name)
            # the float32 comes from a cast of the half activation (directly or through x*x / reshape)
            seen, frontier = set(), [node.input[0]]
            while frontier:
                producer = producers.get(frontier.pop())
                if producer is None or producer.name in seen:
                    continue
                seen.add(producer.name)
                if producer.op_type == "Cast":
                    break
                frontier += [i for i in producer.input if types.get(i) == onnx.TensorProto.FLOAT]
            else:
                pytest.fail(f"{path.name}: {node.name} reads no float32 cast")
    assert reductions > 0, "no GroupNorm moment reductions found"


def test_fp16_engines_generate_the_fp32_engines_latents_within_tolerance(tiny_sdxl, builds):
    from python_backend.cli.generate_job import GenerationJob, run_generation_job
    from python_backend.core.denoise import GenerationRequest
    from python_backend.core.modes import Mode
    from python_backend.core.parallel import ParallelConfig
    from python_backend.core.ranks import run_on_ranks

    request = GenerationRequest("a red circle", height=SIZE, width=SIZE, steps=STEPS, seed=3)
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 1, split_cfg=False)
    latents = {}
    for precision, dtype in (("fp32", "float32"), ("fp16", "float16")):
        job = GenerationJob(str(tiny_sdxl), [(request, parallel)], decode=False, progress=False, dtype=dtype,
                            engine="onnxruntime", engine_dir=str(builds[precision]))
        latents[precision] = run_on_ranks(2, run_generation_job, (job,))[0].latents
    assert np.isfinite(latents["fp16"]).all()
    error = relative_l2(latents["fp16"], latents["fp32"])
    print(f"\nfp16 vs fp32 engines, N = 2: relative L2 of the latents {error:.2e}")
    assert 0 < error < 1e-2  # measured 2.5e-3 (fp16 activations, float32 moments)


class _Moments(torch.nn.Module):
    def forward(self, x):
        moments = patch_math.group_moments(x, 4)
        return patch_math.variance(moments)


def test_large_activations_keep_a_finite_variance_in_the_fp16_graph(tmp_path):
    """E[x^2] of x ~ N(300, 5^2) is 9e4: past float16's 65504. Computed after the cast, it stays exact."""
    x = (300 + 5 * torch.randn(1, 8, 16, 16, generator=torch.Generator().manual_seed(0))).half()
    path = tmp_path / "moments.onnx"
    torch.onnx.export(_Moments(), (x,), str(path), input_names=["x"], output_names=["var"], opset_version=17,
                      dynamo=False)
    import onnxruntime as ort

    (var,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    assert np.isfinite(var).all() and np.allclose(var, 25, rtol=0.2), var
    naive = x.reshape(1, 4, -1).square().mean(-1)  # the same moments in half precision overflow
    assert torch.isinf(naive).all()
