"""What a user of engines runs, through the command line and the real server: ``distrifusion build
--backend onnxruntime --repository``, ``generate --engine onnxruntime``, and ``serve`` on that repository
(the UNet's segments and, the group decoding, every rank's VAE decoder pieces).

One build serves every test here (2 CPU ranks, one patch group of two slabs, 128x128, 3 steps of which
one is a synchronous warm-up step, so two steps run on the engines).
"""

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import group_restarts, rank_workers, relative_l2
from python_backend.cli import main

pytestmark = pytest.mark.slow  # one build, two generations and a server: about 2 min on 2 cores

SIZE, STEPS, WARMUP, RANKS, SEED, GUIDANCE = 128, 3, 1, 2, 42, 5.0
PROMPT = "a photo of an astronaut riding a horse"
COMMON = ["--model", None, "--height", str(SIZE), "--width", str(SIZE), "--ranks", str(RANKS), "--no-split-cfg",
          "--warmup-steps", str(WARMUP), "--steps", str(STEPS), "--scheduler", "euler", "--guidance", str(GUIDANCE)]


def _common(model):
    return [str(model) if arg is None else arg for arg in COMMON]


def _generate(model, out_dir, engine, engine_dir):
    image, latents = out_dir / f"{engine}.png", out_dir / f"{engine}.npy"
    code = main(["generate", *_common(model), "--prompt", PROMPT, "--seed", str(SEED), "--engine", engine,
                 "--engine-dir", str(engine_dir), "--out", str(image), "--latents-out", str(latents)])
    assert code == 0
    return image, latents


@pytest.fixture(scope="module")
def cli_run(tiny_sdxl, tmp_path_factory):
    """``build`` with a repository, then ``generate`` on the engines and on the eager core."""
    root = tmp_path_factory.mktemp("served-engines")
    engines, repository = root / "engines", root / "repository"
    code = main(["build", *_common(tiny_sdxl), "--backend", "onnxruntime", "--out", str(engines),
                 "--repository", str(repository)])
    assert code == 0
    builds = sorted(p.parent for p in engines.glob("*/build.json"))
    assert len(builds) == 1, builds
    outputs = {engine: _generate(tiny_sdxl, root, engine, engines) for engine in ("onnxruntime", "torch")}
    return {"root": root, "engines": engines, "build": builds[0], "repository": repository, "outputs": outputs}


def test_build_writes_every_ranks_segments_and_a_repository_that_decodes_on_the_ranks(cli_run, tiny_sdxl):
    build = cli_run["build"]
    recorded = json.loads((build / "build.json").read_text())
    assert recorded["fields"]["units"] == [2, 2] and recorded["fields"]["batch"] == 2  # 2 slabs, both CFG halves
    for index in range(RANKS):
        manifest = json.loads((build / f"patch{index}" / "manifest.json").read_text())
        files = [manifest["embed"]["file"], *(s["file"] for s in manifest["segments"]), manifest["text_kv"]["file"]]
        assert len(files) == 1 + 7 + 1
        assert all((build / f"patch{index}" / name).is_file() for name in files)
        # and, the rank group decoding (the default), this rank's VAE decoder pieces (tests/test_vae_engines.py)
        decoder = json.loads((build / "vae" / f"rank{index}" / "manifest.json").read_text())
        assert decoder["size"] == RANKS and decoder["latent_shape"] == [1, 4, SIZE // 8, SIZE // 8]
        assert all((build / "vae" / f"rank{index}" / e["file"]).is_file() for e in decoder["program"] if "file" in e)
    repository = cli_run["repository"]
    # N > 1: the rank group decodes (parallel VAE, the default), so there is no single-device vae_decoder
    served = ["denoiser", "pipeline", "pipeline_stream", "postprocess", "text_encoder"]
    assert sorted(p.name for p in repository.iterdir()) == served
    for model in served:
        assert (repository / model / "config.pbtxt").is_file()
    config = (repository / "denoiser" / "config.pbtxt").read_text()
    for key, value in (("engine", "onnxruntime"), ("engine_dir", str(build.resolve())), ("ranks", str(RANKS)),
                       ("split_cfg", "false"), ("parallel_vae", "true"), ("warmup_steps", str(WARMUP)), ("sizes", f"{SIZE}x{SIZE}"),
                       ("default_steps", str(STEPS)), ("model_dir", str(tiny_sdxl.resolve()))):
        assert re.search(rf'key: "{key}" value: {{ string_value: "{re.escape(value)}" }}', config), key


def test_engine_generate_writes_an_image_close_to_the_eager_one(cli_run):
    (ort_image, ort_latents), (_, torch_latents) = cli_run["outputs"]["onnxruntime"], \
        cli_run["outputs"]["torch"]
    image = np.asarray(Image.open(ort_image))
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and image.std() > 0
    ort, eager = np.load(ort_latents), np.load(torch_latents)
    assert ort.shape == eager.shape == (1, 4, SIZE // 8, SIZE // 8)
    error = relative_l2(ort, eager)
    assert error < 1e-4, f"onnxruntime vs eager, same mode: relative L2 {error:.2e}"
    # generate found the build (cache hit): nothing new was exported
    assert len(list(cli_run["engines"].glob("*/build.json"))) == 1


def test_served_engine_image_equals_the_command_lines(cli_run):
    from tritonclient.utils import InferenceServerException

    from python_backend.client import generate
    from python_backend.serving.server import TritonServer, free_ports

    server = TritonServer(cli_run["repository"], *free_ports(3), host="127.0.0.1",
                          workdir=cli_run["root"] / "server")
    server.start()
    try:
        server.wait_ready(300)
        served = generate(server.urls["http"], PROMPT, seed=SEED)  # steps, guidance, scheduler: the built defaults
        # an unguided request cannot run on engines built for the CFG batch: refused naming the field,
        # and the rank group is not restarted for it
        workers = rank_workers(server)
        with pytest.raises(InferenceServerException) as refused:
            generate(server.urls["http"], PROMPT, seed=SEED, guidance_scale=1.0)
        assert "guidance_scale" in str(refused.value) and "above 1" in str(refused.value)
        assert group_restarts(server) == 0 and rank_workers(server) == workers
        explicit = generate(server.urls["grpc"], PROMPT, protocol="grpc", seed=SEED, steps=STEPS,
                            guidance_scale=GUIDANCE, scheduler="euler", height=SIZE, width=SIZE)
        log = server.log_path.read_text()
        assert len(rank_workers(server)) == RANKS  # every rank, rank 0 too
    finally:
        server.stop()
    command_line = np.asarray(Image.open(cli_run["outputs"]["onnxruntime"][0]))
    eager = np.asarray(Image.open(cli_run["outputs"]["torch"][0]))
    # Equal to the engines' image bit for bit (which here differs from the eager core's in one pixel:
    # ONNX Runtime's arithmetic; loading onnxruntime alone proves nothing, diffusers imports it anyway).
    print(f"\nengine vs eager image: {int((command_line != eager).any(axis=-1).sum())} pixel(s) differ")
    np.testing.assert_array_equal(served, command_line)
    np.testing.assert_array_equal(explicit, command_line)
    assert f"denoised {SIZE}x{SIZE}, {STEPS} steps" in log
    assert "the VAE decoder runs on the build's onnxruntime pieces" in log


def _refused_then_served(ranks, model, engine_dir):
    """On one rank group: a request the engines were not built for (64x64), then the built one."""
    from python_backend.core.denoise import GenerationRefused, GenerationRequest
    from python_backend.core.modes import Mode
    from python_backend.core.parallel import ParallelConfig
    from python_backend.engines.loader import load_denoiser

    parallel = ParallelConfig(Mode("corrected_async_gn"), WARMUP, split_cfg=False)
    denoiser = load_denoiser(model, ranks, parallel, "float32", "onnxruntime", engine_dir)
    request = GenerationRequest(PROMPT, height=SIZE, width=SIZE, steps=STEPS, guidance=GUIDANCE, scheduler="euler",
                                seed=SEED)
    try:
        denoiser.generate(GenerationRequest(PROMPT, height=64, width=64, steps=STEPS, guidance=GUIDANCE))
    except GenerationRefused as refused:
        message = str(refused)
    else:
        message = None
    return message, denoiser.generate(request).latents.numpy()


def test_a_request_the_engines_cannot_run_is_refused_on_every_rank_and_the_group_serves_on(cli_run, tiny_sdxl):
    from python_backend.core.ranks import run_on_ranks

    message, latents = run_on_ranks(RANKS, _refused_then_served, (str(tiny_sdxl), str(cli_run["build"])))
    assert message is not None and "built for" in message, message
    # the same group (a rank that had not refused would still hang in the first step's exchange) then
    # ran the built request: the command line's engine latents
    np.testing.assert_array_equal(latents, np.load(cli_run["outputs"]["onnxruntime"][1]))
