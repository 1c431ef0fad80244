"""GPU checks (scripts/run_gpu_tests.sh): NCCL ranks, TensorRT engines, the served float16 path, host synchronisations per step."""

import numpy as np
import pytest
import torch

from conftest import relative_l2
from python_backend.core.denoise import GenerationRequest
from python_backend.core.parallel import ParallelConfig
from python_backend.cli.generate_job import GenerationJob, run_generation_job
from python_backend.core.modes import Mode
from python_backend.core.ranks import run_on_ranks

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 NVIDIA GPUs for NCCL ranks, this machine has {GPUS}")
def test_nccl_full_sync_equals_single_gpu(tiny_sdxl):
    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    runs = [(request, ParallelConfig(Mode.FULL_SYNC, 2, split_cfg=False)),
            (request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False))]
    job = GenerationJob(str(tiny_sdxl), runs, decode=False, progress=False, dtype="float32")
    single = run_on_ranks(1, run_generation_job, (job,), device_kind="cuda")
    double = run_on_ranks(2, run_generation_job, (job,), device_kind="cuda")
    assert relative_l2(double[0].latents, single[0].latents) < 1e-3  # TF32/cuDNN choices differ per slab
    assert relative_l2(double[1].latents, single[0].latents) < 0.2


@pytest.mark.skipif(GPUS < 3, reason=f"needs 3 NVIDIA GPUs for NCCL point-to-point halos (N > 2), this machine has {GPUS}")
def test_nccl_neighbour_halos_and_a_compressed_exchange(tiny_sdxl, monkeypatch):
    """N = 3 routes halo rows point to point (batch_isend_irecv on NCCL) and all-gathers the rest; the
    int8+residual codec runs its quantisation and residual state on the device (every buffer compressed:
    the tiny model's are under the default size floor)."""
    from python_backend.core import exchange_codec

    monkeypatch.setenv("DISTRIFUSION_MIN_COMPRESSED_BYTES", "0")  # the spawned ranks
    monkeypatch.setattr(exchange_codec, "MIN_COMPRESSED_BYTES", 0)  # rank 0, in this process
    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    runs = [(request, ParallelConfig(Mode.FULL_SYNC, 2, split_cfg=False)),
            (request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)),
            (request, ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False, exchange_dtype="int8+residual"))]
    job = GenerationJob(str(tiny_sdxl), runs, decode=False, progress=False, dtype="float32")
    single = run_on_ranks(1, run_generation_job, (job,), device_kind="cuda")
    triple = run_on_ranks(3, run_generation_job, (job,), device_kind="cuda")
    assert relative_l2(triple[0].latents, single[0].latents) < 1e-3
    assert relative_l2(triple[2].latents, triple[1].latents) < 0.05  # the codec's error, not the mode's


def _has_tensorrt() -> bool:
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_engines_match_onnxruntime(tiny_sdxl, tmp_path):
    from python_backend.engines.build import BuildRequest, build

    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    trt = build(BuildRequest(str(tiny_sdxl), 256, 256, 1, backend="tensorrt", precision="fp16", split_cfg=False),
                tmp_path, progress=False)
    assert list(trt.rglob("*.plan")), "TensorRT engines were built"
    ort = build(BuildRequest(str(tiny_sdxl), 256, 256, 1, split_cfg=False), tmp_path, progress=False)
    gpu_job = GenerationJob(str(tiny_sdxl), [(request, parallel)], decode=False, progress=False, dtype="float16",
                            engine="tensorrt", engine_dir=str(trt))
    cpu_job = GenerationJob(str(tiny_sdxl), [(request, parallel)], decode=False, progress=False, dtype="float32",
                            engine="onnxruntime", engine_dir=str(ort))
    on_gpu = run_on_ranks(1, run_generation_job, (gpu_job,), device_kind="cuda")[0]
    on_cpu = run_on_ranks(1, run_generation_job, (cpu_job,), device_kind="cpu")[0]
    assert relative_l2(on_gpu.latents, on_cpu.latents) < 0.05  # fp16 engines against fp32 ONNX Runtime


@pytest.mark.slow
@pytest.mark.skipif(GPUS < 1, reason=f"needs an NVIDIA GPU for the served float16 path, this machine has {GPUS}")
def test_served_float16_on_one_gpu_gives_the_cpu_float32_image_within_tolerance(tiny_sdxl, tmp_path):
    """The default GPU deployment at N = 1: the UNet in float16 on cuda:0, fed the text encoder model's
    float32 conditioning, through the real tritonserver."""
    from conftest import TINY_SIZE, reference_image, served_image_twice, tiny_serving_settings

    prompt, seed, steps = "a lighthouse on a cliff at dusk", 11, 3
    settings = tiny_serving_settings(tiny_sdxl, ranks=1, device="cuda", dtype="float16", warmup_steps=1,
                                     default_steps=steps)
    image, again, restarts = served_image_twice(settings, tmp_path, prompt, seed)
    assert image.shape == (TINY_SIZE, TINY_SIZE, 3) and image.std() > 0
    np.testing.assert_array_equal(image, again)
    difference = float(np.abs(image.astype(np.float64) - reference_image(tiny_sdxl, prompt, seed, steps)).mean())
    print(f"\nserved float16 on the GPU: mean |image - CPU float32 image| = {difference:.3f} levels")
    assert difference < 2.0  # float16 on CPU: 0.16 levels (tests/test_precision.py); GPU kernels differ too
    assert restarts == 0


@pytest.mark.skipif(GPUS < 2 or not _has_tensorrt(),
                    reason=f"needs 2 NVIDIA GPUs with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_engines_at_two_ranks_match_the_eager_unet(tiny_sdxl, tmp_path):
    """Strongly typed float16 engines on two NCCL ranks against the eager float16 UNet on the same
    ranks: the engines serve the asynchronous steps, so the two runs differ only by how each step is
    computed."""
    from python_backend.engines.build import BuildRequest, build

    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    trt = build(BuildRequest(str(tiny_sdxl), 256, 256, 2, backend="tensorrt", precision="fp16", split_cfg=False),
                tmp_path, progress=False)
    jobs = {engine: GenerationJob(str(tiny_sdxl), [(request, parallel)], decode=False, progress=False,
                                  dtype="float16", engine=engine, engine_dir=str(trt) if engine != "torch" else None)
            for engine in ("tensorrt", "torch")}
    engines = run_on_ranks(2, run_generation_job, (jobs["tensorrt"],), device_kind="cuda")[0]
    eager = run_on_ranks(2, run_generation_job, (jobs["torch"],), device_kind="cuda")[0]
    assert np.isfinite(engines.latents).all()
    difference = relative_l2(engines.latents, eager.latents)
    print(f"\nTensorRT float16 engines vs eager float16 at N = 2: latent rel. L2 {difference:.2e}")
    assert difference < 0.02  # fp16 vs fp32 ONNX Runtime engines on CPU: 2.5e-3 (tests/test_fp16_engines.py)


class _ScaledConvolution(torch.nn.Module):
    """A tiny graph for the runner: two inputs (one arrives in the wrong dtype and layout), two outputs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x, scale):
        y = self.conv(x) * scale.reshape(1, -1, 1, 1)
        return y, y.mean(dim=(2, 3))


class _RecordingContext:
    """A TensorRT execution context that notes the stream of every enqueue and passes every call on."""

    def __init__(self, context):
        self.context, self.streams = context, []

    def execute_async_v3(self, stream_handle):
        self.streams.append(stream_handle)
        return self.context.execute_async_v3(stream_handle)

    def __getattr__(self, name):
        return getattr(self.context, name)


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_runner_runs_on_torchs_stream_without_allocating(tmp_path):
    """The runner enqueues on torch's current stream (on a side stream ordered by events when that is the
    default stream), stages only the input that needs it, allocates nothing and synchronises nothing in
    repeated runs, returns the same output tensors every run, and computes what ONNX Runtime computes;
    runners sharing one block of activation memory (USER_MANAGED) too."""
    from python_backend.engines.runners import (
        OnnxRuntimeRunner,
        TensorRTRunner,
        _side_stream,
        build_tensorrt_engine,
        share_device_memory,
    )

    torch.manual_seed(0)
    x, scale = torch.randn(2, 4, 16, 16), torch.rand(8) + 0.5
    onnx_path, plan = tmp_path / "tiny.onnx", tmp_path / "tiny.plan"
    torch.onnx.export(_ScaledConvolution().eval(), (x, scale), str(onnx_path), input_names=["x", "scale"],
                      output_names=["y", "pooled"], opset_version=17, dynamo=False)
    build_tensorrt_engine(onnx_path, plan, tmp_path / "timing.cache")
    expected = OnnxRuntimeRunner(onnx_path).run({"x": x, "scale": scale})
    # x is bound where it lies; scale comes as a strided float64 view and is cast into a staging buffer
    feeds = {"x": x.cuda(), "scale": torch.stack([scale, scale], 1).double().cuda()[:, 0]}
    torch.cuda.synchronize()  # the copies above ran on the default stream; the runs below use another

    runner = TensorRTRunner(plan)
    recorder = runner.context = _RecordingContext(runner.context)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        runner.run(feeds)  # the first run allocates the staging buffer
        allocations = torch.cuda.memory_stats()["allocation.all.allocated"]
        torch.cuda.set_sync_debug_mode("error")
        try:
            runs = [runner.run(feeds) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        allocated = torch.cuda.memory_stats()["allocation.all.allocated"] - allocations
    stream.synchronize()
    assert recorder.streams == [stream.cuda_stream] * 4
    assert allocated == 0, f"{allocated} device allocations in 3 runs"
    assert {run["y"].data_ptr() for run in runs} == {runs[0]["y"].data_ptr()}
    for name in ("y", "pooled"):
        assert relative_l2(runs[-1][name].cpu(), expected[name]) < 1e-2  # TF32 in TensorRT's float32 tactics

    on_default_stream = runner.run(feeds)
    torch.cuda.synchronize()
    assert recorder.streams[-1] == _side_stream(runner.device).cuda_stream != 0
    assert relative_l2(on_default_stream["y"].cpu(), expected["y"]) < 1e-2

    pieces = [TensorRTRunner(plan, shared_memory=True, reuse_outputs=False) for _ in range(2)]
    block = share_device_memory(pieces)
    assert block is None or block.numel() >= max(piece.device_memory_bytes for piece in pieces)
    outputs = [piece.run(feeds) for piece in pieces]
    torch.cuda.synchronize()
    assert all(relative_l2(out["y"].cpu(), expected["y"]) < 1e-2 for out in outputs)


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_engines_at_two_ranks_read_stale_buffers_as_onnxruntime_does(tiny_sdxl, tmp_path):
    """N = 2 on one GPU: rank 0's and rank 1's float16 TensorRT engines run one after another in this
    process over the loopback exchange of tests/engine_loopback.py, so each step reads the K/V, halo rows
    and GroupNorm statistics both ranks published the step before (an NCCL group of two needs two GPUs);
    the same ranks' float32 ONNX Runtime engines on the CPU get the same inputs. Reading the wrong step's
    buffers moves the prediction by > 0.05 (measured 0.28, tests/test_device_engines.py); float16 engines
    against float32 ones on the CPU differ by 1.5e-3."""
    from engine_loopback import run_ranks, step_inputs
    from python_backend.engines.build import BuildRequest, build
    from python_backend.engines.segmented_unet import SegmentedUNet

    size = 128
    builds = {backend: build(BuildRequest(str(tiny_sdxl), size, size, 2, backend=backend, precision=precision,
                                          split_cfg=False), tmp_path, progress=False)
              for backend, precision in (("tensorrt", "fp16"), ("onnxruntime", "fp32"))}
    unets = {backend: [SegmentedUNet(folder / f"patch{r}", backend) for r in range(2)]
             for backend, folder in builds.items()}
    inputs = step_inputs(tiny_sdxl, size, size, steps=4)
    on_gpu = run_ranks(unets["tensorrt"], inputs, torch.device("cuda"), torch.float16)
    on_cpu = run_ranks(unets["onnxruntime"], inputs, torch.device("cpu"), torch.float32)
    errors = [[relative_l2(gpu, cpu) for gpu, cpu in zip(gpu_step, cpu_step)]
              for gpu_step, cpu_step in zip(on_gpu, on_cpu)]
    print(f"\nTensorRT float16 vs ONNX Runtime float32 at N = 2, rel. L2 per step and rank: {errors}")
    assert all(torch.isfinite(noise).all() for step in on_gpu for noise in step)
    assert max(max(step) for step in errors) < 0.02


HOST_SYNCS_PER_STEP = 2  # besides the step's own timing synchronise; issue 12 takes the hot path further


@pytest.mark.skipif(GPUS < 1, reason=f"needs an NVIDIA GPU to count host synchronisations, this machine has {GPUS}")
def test_host_synchronisations_per_step_are_counted_and_bounded(tiny_sdxl):
    """CUDA's synchronising calls made implicitly by the step (``.item()``, copies to the host, ...),
    counted with torch's sync debug mode per step of a float16 generation on one GPU."""
    import warnings

    from python_backend.core.ranks import RankGroup
    from python_backend.engines.loader import load_denoiser

    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 1, split_cfg=False)
    denoiser = load_denoiser(str(tiny_sdxl), RankGroup.single("cuda"), parallel, dtype="float16")
    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    denoiser.generate(request)  # first call: allocations and kernel choices, not counted
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            torch.ones(1, device="cuda").item()  # the counter itself: exactly one synchronising call
            probe = len(caught)
            seen.append(len(caught))
            denoiser.generate(request, on_step=lambda i, synchronous, latents: seen.append(len(caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in zip(seen, seen[1:])]
    print(f"\nhost synchronisations per step: {per_step}")
    for warning in caught[probe:probe + 10]:
        print("  ", str(warning.message).splitlines()[0], warning.filename, warning.lineno)
    assert probe == 1, "torch's sync debug mode did not see the probe's .item()"
    assert max(per_step[1:]) <= HOST_SYNCS_PER_STEP, per_step


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_decoder_pieces_match_the_eager_decoder(tiny_sdxl, tmp_path):
    """Rank 1 of 3 decodes alone on one GPU (the other slabs' data stood in by its own, the same stand-ins
    for both): its TensorRT decoder pieces, sharing one block of activation memory, against the eager
    patched decoder."""
    from python_backend.core.exchange import LoneRankExchange
    from python_backend.core.model import load_vae
    from python_backend.core.patch_vae import ParallelVaeDecoder
    from python_backend.engines.runners import build_tensorrt_engine
    from python_backend.engines.vae_segments import SegmentedVaeDecoder, export_decoder

    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "rank1"
    export_decoder(load_vae(tiny_sdxl, torch.device("cpu")), tuple(latents.shape), 3, 1, 1, folder)
    for onnx_file in sorted(folder.glob("*.onnx")):
        build_tensorrt_engine(onnx_file, onnx_file.with_suffix(".plan"), tmp_path / "timing.cache")
    pieces = SegmentedVaeDecoder(folder, "tensorrt", 3, "cuda")
    assert pieces.device_memory is not None  # one block for every piece
    on_pieces = ParallelVaeDecoder(None, None, 1, 3, engine=pieces, exchange=LoneRankExchange(1, 3))
    eager = ParallelVaeDecoder(load_vae(tiny_sdxl, torch.device("cuda")), None, 1, 3,
                               exchange=LoneRankExchange(1, 3))
    image = on_pieces.decode(latents.cuda())
    reference = eager.decode(latents.cuda())
    assert image.device.type == "cuda" and image.shape == reference.shape
    assert relative_l2(image.float().cpu(), reference.float().cpu()) < 1e-3  # TF32 and TensorRT tactics


# --- CUDA graphs (generate/build --cuda-graphs, served cuda_graphs: engines/cuda_graph.py) -------------------


def _capture_beside_a_collective(rank, init_file):
    """In a process of its own: a one-rank NCCL group (its watchdog thread polls NCCL's events) with an
    all-gather enqueued just before each launch, so the capture happens with a collective in flight."""
    import torch.distributed as dist

    from python_backend.engines.cuda_graph import CapturedLaunch

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        source, target = torch.empty(1 << 20, device=device), torch.empty(1 << 20, device=device)
        payload, gathered = torch.ones(1 << 16, device=device), torch.empty(1 << 16, device=device)

        def enqueue(stream):
            with torch.cuda.stream(stream):
                torch.mul(source, 2.0, out=target)
                target.add_(1.0)

        launch = CapturedLaunch(enqueue, device, "test work")
        stream = torch.cuda.Stream()
        for call in range(5):
            with torch.cuda.stream(stream):
                source.fill_(float(call))
                work = dist.all_gather_into_tensor(gathered, payload, async_op=True)
                before = torch.cuda.memory_stats()["allocation.all.allocated"]
                launch.launch(stream)
                allocated = torch.cuda.memory_stats()["allocation.all.allocated"] - before
            stream.synchronize()
            work.wait()
            assert torch.equal(target, torch.full_like(target, 2.0 * call + 1)), f"call {call}"
            assert (launch.graph is not None) == (call >= 1) and not launch.failed
            if call >= 2:
                assert allocated == 0, f"a replay allocated {allocated} times"
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(GPUS < 1, reason=f"needs an NVIDIA GPU to capture CUDA graphs, this machine has {GPUS}")
def test_a_captured_launch_replays_its_work_on_each_calls_values(tmp_path):
    """The first call runs directly, the second is captured (thread-local mode, an NCCL collective in
    flight) and replayed, later calls replay: each call computes from that call's input, and a replay
    allocates nothing."""
    import torch.multiprocessing as mp

    mp.start_processes(_capture_beside_a_collective, args=(str(tmp_path / "rendezvous"),), nprocs=1,
                       start_method="spawn")


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_runner_replays_a_cuda_graph_on_new_inputs(tmp_path):
    """``cuda_graph=True``: TensorRT enqueues twice (the warm-up run and the capture), every later run is a
    replay; inputs at new addresses and with new values each run (copied into the runner's own buffers)
    give what ONNX Runtime computes for them; the runner refuses shared activation memory."""
    from python_backend.engines.runners import OnnxRuntimeRunner, TensorRTRunner, build_tensorrt_engine

    torch.manual_seed(0)
    xs, scale = [torch.randn(2, 4, 16, 16) for _ in range(5)], torch.rand(8) + 0.5
    onnx_path, plan = tmp_path / "tiny.onnx", tmp_path / "tiny.plan"
    torch.onnx.export(_ScaledConvolution().eval(), (xs[0], scale), str(onnx_path), input_names=["x", "scale"],
                      output_names=["y", "pooled"], opset_version=17, dynamo=False)
    build_tensorrt_engine(onnx_path, plan, tmp_path / "timing.cache")
    reference = OnnxRuntimeRunner(onnx_path)

    runner = TensorRTRunner(plan, cuda_graph=True)
    recorder = runner.context = _RecordingContext(runner.context)
    stream, results = torch.cuda.Stream(), []
    with torch.cuda.stream(stream):
        for x in xs:
            outputs = runner.run({"x": x.cuda(), "scale": scale.cuda()})
            results.append(outputs["y"].clone())
    stream.synchronize()
    assert len(recorder.streams) == 2 and runner._graph.graph is not None and not runner._graph.failed
    for x, y in zip(xs, results):
        assert relative_l2(y.cpu(), reference.run({"x": x, "scale": scale})["y"]) < 1e-2
    with pytest.raises(ValueError, match="CUDA graph needs a runner with its own activation memory"):
        TensorRTRunner(plan, shared_memory=True, reuse_outputs=False, cuda_graph=True)


@pytest.mark.skipif(GPUS < 1 or not _has_tensorrt(),
                    reason=f"needs an NVIDIA GPU with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_tensorrt_engines_replayed_as_cuda_graphs_read_stale_buffers_as_direct_enqueues_do(tiny_sdxl, tmp_path):
    """N = 2 on one GPU over the loopback exchange: every step's stale inputs lie at new addresses, which
    the graphs must copy in; the replayed segments give the direct enqueues' predictions step by step."""
    from engine_loopback import run_ranks, step_inputs
    from python_backend.engines.build import BuildRequest, build
    from python_backend.engines.segmented_unet import SegmentedUNet

    folder = build(BuildRequest(str(tiny_sdxl), 128, 128, 2, backend="tensorrt", precision="fp16", split_cfg=False),
                   tmp_path, progress=False)
    inputs = step_inputs(tiny_sdxl, 128, 128, steps=4)
    direct = run_ranks([SegmentedUNet(folder / f"patch{r}", "tensorrt") for r in range(2)], inputs,
                       torch.device("cuda"), torch.float16)
    graphed_unets = [SegmentedUNet(folder / f"patch{r}", "tensorrt", cuda_graphs=True) for r in range(2)]
    graphed = run_ranks(graphed_unets, inputs, torch.device("cuda"), torch.float16)
    runners = [runner for unet in graphed_unets for runner in [unet.embed] + [r for _, r in unet.segments]]
    assert all(runner._graph.graph is not None for runner in runners)
    errors = [relative_l2(a, b) for step_a, step_b in zip(graphed, direct) for a, b in zip(step_a, step_b)]
    print(f"\nCUDA graphs vs direct enqueues at N = 2, rel. L2 per step and rank: {errors}")
    assert max(errors) < 1e-3  # the same kernels; only TensorRT's nondeterministic tactics may differ


@pytest.mark.skipif(GPUS < 2 or not _has_tensorrt(),
                    reason=f"needs 2 NVIDIA GPUs with tensorrt and polygraphy installed (GPUs here: {GPUS})")
def test_cuda_graphs_at_two_nccl_ranks_give_the_direct_engines_latents(tiny_sdxl, tmp_path):
    """The served/generate path with ``cuda_graphs``: NCCL's collectives between replayed segments."""
    from python_backend.engines.build import BuildRequest, build

    request = GenerationRequest("a photo of an astronaut", height=256, width=256, steps=6, seed=1)
    parallel = ParallelConfig(Mode.CORRECTED_ASYNC_GN, 2, split_cfg=False)
    trt = build(BuildRequest(str(tiny_sdxl), 256, 256, 2, backend="tensorrt", precision="fp16", split_cfg=False),
                tmp_path, progress=False)
    outputs = [run_on_ranks(2, run_generation_job, (GenerationJob(
        str(tiny_sdxl), [(request, parallel)], decode=False, progress=False, dtype="float16", engine="tensorrt",
        engine_dir=str(trt), cuda_graphs=graphs),), device_kind="cuda")[0] for graphs in (False, True)]
    assert np.isfinite(outputs[1].latents).all()
    assert relative_l2(outputs[1].latents, outputs[0].latents) < 1e-3
