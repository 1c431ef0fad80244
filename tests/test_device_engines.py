"""Engines that keep tensors on the device, the parts that run on a CPU: which backend may feed which
ranks (refused before any work), the TensorRT runner's binding and stream decisions, and the output
ownership a TensorRT runner relies on (runners that return the same output tensors every run), through
the real exchange and through the in-process loopback that tests/test_gpu.py drives TensorRT with."""

from contextlib import contextmanager, nullcontext

import pytest
import torch

from conftest import relative_l2
from engine_loopback import LoopbackGroup, run_ranks, step_inputs
from python_backend.core.denoise import GenerationRequest
from python_backend.core.modes import Mode
from python_backend.core.parallel import ParallelConfig
from python_backend.core.ranks import RankGroup, run_on_ranks
from python_backend.engines import runners
from python_backend.engines.build import BuildRequest, build
from python_backend.engines.runners import (
    EngineDeviceError,
    TensorSpec,
    bindable,
    check_backend_device,
    overlaps,
    runs_on_current_stream,
)

MISSING_MODEL = "/nonexistent/model"  # anything that reads the model first fails differently


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 1)])
def test_onnxruntime_engines_are_refused_for_gpu_ranks(device):
    with pytest.raises(EngineDeviceError) as refused:
        check_backend_device("onnxruntime", device)
    message = str(refused.value)
    assert "host tensors" in message and "--backend tensorrt" in message and "--device cpu" in message


def test_tensorrt_engines_are_refused_for_cpu_ranks():
    with pytest.raises(EngineDeviceError, match="--backend onnxruntime"):
        check_backend_device("tensorrt", "cpu")


@pytest.mark.parametrize("backend,device", [("onnxruntime", "cpu"), ("tensorrt", "cuda:1"), ("torch", "cuda"),
                                            ("torch", "cpu")])
def test_backends_that_fit_their_ranks_pass(backend, device):
    check_backend_device(backend, device)


def test_the_loader_refuses_before_loading_anything():
    from python_backend.engines.loader import load_denoiser, load_parallel_decoder

    ranks = RankGroup.single("cuda:1")  # a device name is enough: nothing touches the GPU
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    with pytest.raises(EngineDeviceError):
        load_denoiser(MISSING_MODEL, ranks, parallel, "float16", "onnxruntime", "/nonexistent/build")
    with pytest.raises(EngineDeviceError):
        load_parallel_decoder(MISSING_MODEL, ranks, "onnxruntime", "/nonexistent/build")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_cuda_graphs_are_refused_without_tensorrt_engines(backend):
    from python_backend.engines.loader import load_denoiser
    from python_backend.engines.runners import check_cuda_graphs

    with pytest.raises(EngineDeviceError, match="--engine tensorrt"):
        check_cuda_graphs(backend)
    check_cuda_graphs("tensorrt")
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    with pytest.raises(EngineDeviceError, match="CUDA graphs replay TensorRT segment engines"):
        load_denoiser(MISSING_MODEL, RankGroup.single("cpu"), parallel, "float32", backend, "/nonexistent/build",
                      cuda_graphs=True)  # before the model is read
    with pytest.raises(EngineDeviceError):
        runners.make_runner(backend, "/nonexistent/engine.onnx", cuda_graph=True)


@pytest.mark.parametrize("parameters, message", [
    (dict(engine="onnxruntime", cuda_graphs=True), "'cuda_graphs' is true: CUDA graphs replay TensorRT segment engines"),
    (dict(cuda_graphs=True), "'cuda_graphs' is true: CUDA graphs replay TensorRT segment engines; the 'torch'"),
    (dict(engine="onnxruntime", device="cuda"), "'engine' is 'onnxruntime': ONNX Runtime engines run on the CPU"),
    (dict(exchange_dtype="int3"), "'exchange_dtype'"),
])
def test_the_served_denoiser_refuses_parameters_that_do_not_fit(parameters, message):
    """What the denoiser's ``initialize`` checks before any rank starts (the Triton model itself needs the
    server's stub to import)."""
    from python_backend.serving.settings import ServingSettings, check_denoiser_settings

    settings = ServingSettings(**parameters)
    with pytest.raises(ValueError, match="model config parameter " + message.replace("(", r"\(")):
        check_denoiser_settings(settings, parameters.get("device", "cpu"))


def test_the_build_refuses_before_doing_any_work(tmp_path):
    request = BuildRequest(MISSING_MODEL, 128, 128, 2, backend="onnxruntime")
    with pytest.raises(EngineDeviceError):
        build(request, tmp_path, progress=False, device="cuda:1")
    assert list(tmp_path.iterdir()) == []


def _aligned(shape, dtype=torch.float32) -> torch.Tensor:
    """A contiguous CPU tensor whose address is 256-byte aligned (CPU allocations are only 64-byte aligned)."""
    count = int(torch.Size(shape).numel())
    element = torch.empty((), dtype=dtype).element_size()
    base = torch.zeros(count + 256 // element, dtype=dtype)
    skip = (-base.data_ptr() % 256) // element
    return base[skip : skip + count].view(shape)


def test_inputs_that_are_already_right_are_bound_by_address():
    spec = TensorSpec("x", (2, 3, 8), torch.float32)
    cpu = torch.device("cpu")
    right = _aligned((2, 3, 8))
    assert bindable(right, spec, cpu)
    assert not bindable(right.half(), spec, cpu)  # wrong dtype: cast into the staging buffer
    assert not bindable(right.transpose(0, 1).contiguous().transpose(0, 1), spec, cpu)  # not contiguous
    assert not bindable(torch.zeros(1, 3, 8).expand(2, 3, 8), spec, cpu)  # a broadcast view
    assert not bindable(_aligned((2 * 3 * 8 + 1,))[1:].view(2, 3, 8), spec, cpu)  # 4 bytes off alignment
    assert not bindable(right, spec, torch.device("cuda", 0))  # another device
    assert not bindable(right, spec, cpu, own_outputs=[right.view(-1)[8:]])  # lies in the engine's outputs
    assert bindable(right, spec, cpu, own_outputs=[_aligned((48,))])
    with pytest.raises(ValueError, match="built for"):
        bindable(torch.zeros(2, 3, 9), spec, cpu)  # static shapes: never broadcast or cut


def test_overlapping_memory_is_seen():
    base = torch.zeros(64)
    assert overlaps(base[8:16], [base[12:40]]) and overlaps(base[8:16], [base])
    assert not overlaps(base[8:16], [base[16:32], base[:8]])  # touching is not overlapping


def test_engines_run_on_torchs_stream_unless_it_is_a_cuda_default_stream():
    assert not runs_on_current_stream(0)  # torch's default stream: TensorRT would synchronise the device
    assert not runs_on_current_stream(1) and not runs_on_current_stream(2)  # cudaStreamLegacy, per-thread
    assert runs_on_current_stream(0x7F3A_2C00_1000)


@contextmanager
def _runners_reusing_their_outputs():
    """ONNX Runtime runners that return the same output tensors from every run, overwritten in place, as
    ``TensorRTRunner`` does."""
    original = runners.OnnxRuntimeRunner.run

    def held(self, feeds):
        kept = self.__dict__.setdefault("held_outputs", {})
        for name, tensor in original(self, feeds).items():
            kept.setdefault(name, torch.empty_like(tensor)).copy_(tensor)
        return dict(kept)

    runners.OnnxRuntimeRunner.run = held
    try:
        yield
    finally:
        runners.OnnxRuntimeRunner.run = original


def _generate(ranks, job, reuse_outputs: bool):
    from python_backend.cli.generate_job import run_generation_job

    with _runners_reusing_their_outputs() if reuse_outputs else nullcontext():
        (output,) = run_generation_job(ranks, job)
    return output


@pytest.mark.parametrize("world_size", [1])
def test_runners_that_reuse_their_outputs_give_the_same_latents(tiny_sdxl, engine_root, world_size):
    """The ownership SegmentedUNet and the exchange keep (see segmented_unet.py): nothing reads a runner's
    output after the same runner ran again. At N = 1 the output gather hands the engine's own tensor on;
    at N = 2 the loopback test below runs the same check on both ranks' engines, step by step."""
    from python_backend.cli.generate_job import GenerationJob

    folder = build(BuildRequest(str(tiny_sdxl), 128, 128, world_size, split_cfg=False), engine_root, progress=False)
    request = GenerationRequest("a photo of an astronaut", height=128, width=128, steps=5, guidance=5.0, seed=3)
    job = GenerationJob(str(tiny_sdxl), [(request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False))],
                        decode=False, progress=False, engine="onnxruntime", engine_dir=str(folder))
    fresh = run_on_ranks(world_size, _generate, (job, False))
    reused = run_on_ranks(world_size, _generate, (job, True))
    assert relative_l2(reused.latents, fresh.latents) < 1e-6


class _FrozenAfterWarmup(LoopbackGroup):
    """Keeps the warm-up step's buffers for good (what a stale-buffer bug that never updates would read)."""

    def end_step(self):
        if not self.published:
            super().end_step()
        self.pending = {}


def test_the_loopback_ranks_read_last_steps_buffers(tiny_sdxl, engine_root):
    """The harness of tests/test_gpu.py's TensorRT check at N = 2, on ONNX Runtime: what a rank reads stale
    changes its output (so a stale-buffer error cannot hide under the GPU test's tolerance), and runners that
    reuse their outputs give exactly the same predictions."""
    from python_backend.engines.segmented_unet import SegmentedUNet

    folder = build(BuildRequest(str(tiny_sdxl), 128, 128, 2, split_cfg=False), engine_root, progress=False)
    inputs = step_inputs(tiny_sdxl, 128, 128, steps=3)
    cpu = torch.device("cpu")
    unets = [SegmentedUNet(folder / f"patch{r}", "onnxruntime") for r in range(2)]
    steps = run_ranks(unets, inputs, cpu, torch.float32)
    frozen = run_ranks(unets, inputs, cpu, torch.float32, group_class=_FrozenAfterWarmup)
    assert len(steps) == 3 and all(len(step) == 2 for step in steps)
    assert all(torch.isfinite(noise).all() for step in steps for noise in step)
    assert relative_l2(steps[0][0], frozen[0][0]) < 1e-6  # step 1 reads the warm-up's buffers either way
    sensitivity = min(relative_l2(steps[k][r], frozen[k][r]) for k in (1, 2) for r in (0, 1))
    print(f"\nloopback: last step's buffers vs the warm-up's, rel. L2 of the prediction >= {sensitivity:.2e}")
    assert sensitivity > 0.05  # the GPU test's tolerance (fp16 TensorRT vs fp32 ONNX Runtime) is 0.02

    with _runners_reusing_their_outputs():
        reused = run_ranks(unets, inputs, cpu, torch.float32)
    assert all(torch.equal(a, b) for step_a, step_b in zip(reused, steps) for a, b in zip(step_a, step_b))
