"""What the benchmark scripts share."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: `clients`


def model_or_trained(model: Path | None) -> Path:
    """``model``, or the trained embedded model copied to a fresh temporary folder."""
    if model is not None:
        return Path(model)
    from python_backend.embedded.tiny_model import write_trained_sdxl

    return write_trained_sdxl(Path(tempfile.mkdtemp()) / "trained-sdxl")


def model_or_tiny(model: Path | None) -> Path:
    """``model``, or the tiny random-weight SDXL-layout model (seed 0) written to a fresh temporary folder."""
    if model is not None:
        return Path(model)
    from python_backend.embedded.tiny_model import write_tiny_sdxl

    return write_tiny_sdxl(Path(tempfile.mkdtemp()) / "tiny-sdxl", seed=0)


HAND_WRITTEN = "<!-- written by hand below this line; the benchmark keeps it -->"


def write_report_keeping_notes(path: Path, lines: list[str]) -> None:
    """Write a benchmark's generated ``lines`` to ``path``, keeping what a person wrote below :data:`HAND_WRITTEN`."""
    kept = path.read_text().partition(HAND_WRITTEN)[2] if path.exists() else ""
    path.write_text("\n".join(lines) + "\n" + HAND_WRITTEN + (kept or "\n"))


def add_guidance_argument(parser: argparse.ArgumentParser) -> None:
    """``--guidance``, defaulting to the guidance the embedded model draws its captions best at."""
    from python_backend.embedded.training import SAMPLING_GUIDANCE

    parser.add_argument("--guidance", type=float, default=SAMPLING_GUIDANCE,
                        help="classifier-free guidance scale (default: the embedded model's, see docs/embedded_model.md)")
