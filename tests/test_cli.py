"""The ``distrifusion`` command: bad values get a one-line message naming the flag; a real run works."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from python_backend.cli import main


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
        (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
        (["--ranks", "0"], "--ranks must be >= 1, got 0"),
        (["--num-images", "0"], "--num-images must be >= 1, got 0"),
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0, got -1"),
        (["--scheduler", "lms"], "argument --scheduler: invalid choice: 'lms'"),
        (["--mode", "async"], "argument --mode: invalid choice: 'async'"),
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
