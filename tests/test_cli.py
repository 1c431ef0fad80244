"""The ``distrifusion`` command: bad values get a one-line message naming the flag; a real run works."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from python_backend.cli import main
from python_backend.core.defaults import MAX_STEPS


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


def _generate_args(model, *extra):
    return ["generate", "--model", str(model), "--prompt", "a cat", "--out", "unused.png", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "500"], "--height must be a positive multiple of 8, got 500"),
        (["--width", "-8"], "--width must be a positive multiple of 8, got -8"),
        (["--height", "200"], "--height and --width must be multiples of 32 for this model"),
        (["--height", "128", "--ranks", "5", "--no-split-cfg"], "--ranks 5 is too many for --height 128 (at most 4)"),
        (["--height", "128", "--ranks", "10"], "--ranks 10 is too many for --height 128 (at most 8)"),
        (["--steps", "0"], f"--steps must be between 1 and {MAX_STEPS}, got 0"),
        (["--ranks", "0"], "--ranks must be >= 1, got 0"),
        (["--num-images", "0"], "--num-images must be >= 1, got 0"),
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
        (["--scheduler", "lms"], "argument --scheduler: invalid choice: 'lms'"),
        (["--mode", "async"], "argument --mode: invalid choice: 'async'"),
        (["--exchange-dtype", "int4"], "argument --exchange-dtype: invalid choice: 'int4'"),
        # refused before any engine is built: TensorRT engines cannot feed CPU ranks
        (["--engine", "tensorrt", "--device", "cpu"], "--engine tensorrt: TensorRT engines run on NVIDIA GPUs only"),
        # CUDA graphs replay TensorRT segments only: the eager core and ONNX Runtime have none
        (["--cuda-graphs"], "--cuda-graphs: CUDA graphs replay TensorRT segment engines; the 'torch' engine"),
        (["--cuda-graphs", "--engine", "onnxruntime"], "--cuda-graphs: CUDA graphs replay TensorRT segment engines"),
    ],
)
def test_bad_values_name_the_flag(tiny_sdxl, capsys, extra, message):
    assert _run(_generate_args(tiny_sdxl, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_missing_model_folder(tmp_path, capsys):
    assert _run(_generate_args(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model: no diffusers model folder at" in err[0]


def test_generate_on_two_ranks_writes_image_and_latents(tiny_sdxl, tmp_path):
    out, latents = tmp_path / "image.png", tmp_path / "latents.npy"
    command = [sys.executable, "-m", "python_backend.cli", "generate", "--model", str(tiny_sdxl),
               "--prompt", "a lighthouse at dusk", "--height", "192", "--width", "128", "--steps", "5",
               "--ranks", "2", "--no-split-cfg", "--warmup-steps", "2", "--out", str(out),
               "--latents-out", str(latents)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "denoising on 2 rank(s), corrected_async_gn" in done.stderr  # progress per step
    image = np.asarray(Image.open(out))
    assert image.shape == (192, 128, 3) and image.dtype == np.uint8 and image.std() > 0
    array = np.load(latents)
    assert array.shape == (1, 4, 24, 16) and array.dtype == np.float32


# --- build recipes (distrifusion build --recipe FILE) ----------------------------------------------


def _served_settings(repository):
    """The settings the served denoiser will read, parsed from the filled config as Triton would."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from python_backend.serving.settings import ServingSettings

    config = text_format.Parse((repository / "denoiser" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return ServingSettings.from_model_config(json_format.MessageToJson(config, preserving_proto_field_name=True))


def _recipe(tmp_path, model, repository, top="", served=""):
    path = tmp_path / "deploy.toml"
    path.write_text(f"""\
model = "{model}"
height = 128
width = 256
ranks = 2
backend = "torch"
mode = "sync_gn"
warmup_steps = 1
split_cfg = false
repository = "{repository}"
{top}
[served]
steps = 3
guidance = 4.5
scheduler = "ddim"
{served}
""")
    return path


def test_build_recipe_values_are_used(tiny_sdxl, tmp_path, capsys):
    repository = tmp_path / "repository"
    assert _run(["build", "--recipe", str(_recipe(tmp_path, tiny_sdxl, repository))]) == 0
    assert f"model repository ready at {repository}" in capsys.readouterr().out
    settings = _served_settings(repository)
    assert (settings.model_dir, settings.sizes, settings.ranks, settings.engine, settings.mode, settings.warmup_steps,
            settings.split_cfg) == (str(tiny_sdxl.resolve()), "128x256", 2, "torch", "sync_gn", 1, False)
    assert (settings.default_steps, settings.default_guidance, settings.default_scheduler,
            settings.default_height, settings.default_width) == (3, 4.5, "ddim", 128, 256)


def test_build_flags_override_the_recipe(tiny_sdxl, tmp_path):
    repository = tmp_path / "repository"
    recipe = _recipe(tmp_path, tiny_sdxl, tmp_path / "not-this-one")
    assert _run(["build", "--recipe", str(recipe), "--repository", str(repository), "--steps", "7",
                 "--height", "256", "--mode", "stale_gn", "--scheduler", "euler-a"]) == 0
    assert not (tmp_path / "not-this-one").exists()
    settings = _served_settings(repository)
    assert (settings.default_steps, settings.sizes, settings.mode, settings.default_scheduler) == \
        (7, "256x256", "stale_gn", "euler-a")
    assert (settings.ranks, settings.default_guidance, settings.split_cfg) == (2, 4.5, False)  # the recipe's


@pytest.mark.parametrize("top, served, message", [
    ('colour = "red"', "", "unknown key 'colour'"),
    ("", 'sheduler = "ddim"', "unknown key 'served.sheduler'"),
    ("num_images = \"two\"", "", "'num_images' must be an integer, got 'two'"),
])
def test_build_recipe_errors_name_the_key(tiny_sdxl, tmp_path, capsys, top, served, message):
    recipe = _recipe(tmp_path, tiny_sdxl, tmp_path / "repository", top=top, served=served)
    assert _run(["build", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distrifusion build: error: --recipe: "), err
    assert message in err[0], err[0]
    assert not (tmp_path / "repository").exists()
