"""Procedural captioned images: one coloured shape on a background, with a caption that describes it.

A small text-to-image model trained on real photographs needs data that cannot be downloaded here; this module
makes its own. Every image shows exactly one object, described completely by a short caption:

    "a large red circle at the top left on a blue background"

The vocabulary is small and closed (``COLOURS``, ``SHAPES``, ``POSITIONS``, ``SIZES``, ``TEXTURES``), so a model's
output can be checked attribute by attribute (see ``caption_checker``) and captions can be held out by
combination. Everything is deterministic: ``dataset(n, seed)`` gives byte-identical images for the same seed, and
``render(spec)`` without a generator draws the canonical image of a scene (no jitter).

Geometry, at image side S: the object's centroid sits at 0.2, 0.5 or 0.8 of the width and height (its 3x3 grid
cell; far from the 1/3 and 2/3 cell borders), and its extent (the larger side of its bounding box) is
``SIZE_EXTENTS[size] * S``. Shapes are upright: the triangle points up, the star has one point up. With a
generator, the centroid moves by up to ``POSITION_JITTER * S``, the extent by up to ``SIZE_JITTER`` (relative),
and each colour channel by up to ``COLOUR_JITTER``; even then a large shape stays clear of the image border.

numpy and Pillow only (no torch), so data generation runs anywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------

# Named colours, far apart in RGB (the closest pair, orange and yellow, is about 80 apart), so a reader can
# tell them apart after noise, blur and a colour shift of a few tens of levels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Position name -> (row, column) of its cell in the 3x3 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SIZES: tuple[str, ...] = ("small", "large")
# Background textures and the word the caption uses for each ("" = not mentioned).
TEXTURES: dict[str, str] = {"plain": "", "gradient": "shaded", "noise": "grainy"}
TEXTURE_WEIGHTS: dict[str, float] = {"plain": 0.5, "gradient": 0.25, "noise": 0.25}

# --------------------------------------------------------------------------------------
# Geometry (fractions of the image side)
# --------------------------------------------------------------------------------------

CELL_CENTRES: tuple[float, float, float] = (0.2, 0.5, 0.8)  # centroid of an object in grid row/column 0, 1, 2
SIZE_EXTENTS: dict[str, float] = {"small": 0.15, "large": 0.27}  # bounding-box extent / image side
POSITION_JITTER = 0.02  # largest centroid shift, fraction of the image side
SIZE_JITTER = 0.07  # largest relative change of the extent
COLOUR_JITTER = 10  # largest shift of one colour channel, in levels
STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star (fatter arms than the regular 0.38)
GRADIENT_AMPLITUDE = 18.0  # brightness change from the centre to an edge of a "gradient" background, levels
NOISE_SIGMA = 6.0  # per-pixel brightness noise of a "noise" background, levels
SUPERSAMPLING = 4  # shapes are drawn at this multiple of the image size, then box-filtered down


@dataclass(frozen=True)
class SceneSpec:
    """One scene: a single ``shape`` of ``colour`` at ``position`` and ``size``, on a ``background`` colour.

    ``texture`` is the background's look: "plain", "gradient" (a mild linear brightness ramp) or "noise" (mild
    per-pixel grain). The background colour always differs from the object's, so the object is visible.
    """

    shape: str
    colour: str
    position: str
    size: str
    background: str
    texture: str = "plain"

    def __post_init__(self) -> None:
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                      ("position", self.position, POSITIONS), ("size", self.size, SIZES),
                                      ("background", self.background, COLOURS),
                                      ("texture", self.texture, TEXTURES)):
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; expected one of {list(allowed)}")
        if self.background == self.colour:
            raise ValueError(f"the background colour must differ from the object colour ({self.colour!r})")

    def caption(self) -> str:
        """The scene in words, e.g. "a small green star at the center on a grainy orange background"."""
        background = " ".join(w for w in (TEXTURES[self.texture], self.background) if w)
        return (f"a {self.size} {self.colour} {self.shape} at the {self.position} "
                f"on {_article(background)} {background} background")


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def random_scene(rng: np.random.Generator) -> SceneSpec:
    """A scene drawn uniformly over shapes, colours, positions and sizes (the background among the other
    colours), the texture by ``TEXTURE_WEIGHTS``."""
    colours = list(COLOURS)
    colour = colours[rng.integers(len(colours))]
    backgrounds = [c for c in colours if c != colour]
    textures = list(TEXTURE_WEIGHTS)
    weights = np.array([TEXTURE_WEIGHTS[t] for t in textures])
    return SceneSpec(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour,
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        size=SIZES[rng.integers(len(SIZES))],
        background=backgrounds[rng.integers(len(backgrounds))],
        texture=textures[rng.choice(len(textures), p=weights / weights.sum())],
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------

def shape_outline(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Polygon vertices (x, y; y down) of an upright ``shape`` with centroid (cx, cy) and bounding-box extent
    ``extent`` (the larger side). The circle is a 96-gon, closer to a true circle than a supersample."""
    if shape == "circle":
        r = extent / 2
        angles = (2 * math.pi * k / 96 for k in range(96))
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if shape == "square":
        h = extent / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, width = extent; the centroid is the circumcentre
        r = extent / math.sqrt(3)
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in map(math.radians, (-90, 30, 150))]
    if shape == "star":  # ten vertices, points and notches; width = 2 R sin(72 degrees); centroid = centre
        r = extent / (2 * math.sin(math.radians(72)))
        radii = [r if k % 2 == 0 else r * STAR_INNER_RATIO for k in range(10)]
        angles = [math.radians(-90 + 36 * k) for k in range(10)]
        return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in zip(radii, angles)]
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(shape: str, cx: float, cy: float, extent: float, size: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, [size, size] float in [0, 1], by supersampling."""
    ss = SUPERSAMPLING
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    # Pixel i of the image spans [i, i + 1); its supersamples are centred at (i + (j + 0.5) / ss): shift by 0.5.
    points = [(x * ss - 0.5, y * ss - 0.5) for x, y in shape_outline(shape, cx, cy, extent)]
    draw.polygon(points, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _background(spec: SceneSpec, colour: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """The background as float RGB [size, size, 3]: flat, or with a brightness ramp or grain on top."""
    image = np.broadcast_to(colour, (size, size, 3)).astype(np.float64)
    if spec.texture == "gradient":
        angle = rng.uniform(0, 2 * math.pi) if rng is not None else math.pi / 2  # canonical: lighter at the bottom
        t = (np.arange(size) + 0.5) / size * 2 - 1  # -1 .. 1 across the image
        ramp = math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None]
        image = image + GRADIENT_AMPLITUDE * ramp[..., None]
    elif spec.texture == "noise":
        grain_rng = rng if rng is not None else np.random.default_rng(0)  # canonical grain without a generator
        image = image + NOISE_SIGMA * grain_rng.standard_normal((size, size, 1))
    return image


def _jittered_colour(name: str, rng: np.random.Generator | None) -> np.ndarray:
    colour = np.array(COLOURS[name], dtype=np.float64)
    if rng is not None:
        colour = np.clip(colour + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    return colour


def render(spec: SceneSpec, size: int = 256, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``spec`` as an RGB uint8 array [size, size, 3], antialiased.

    With ``rng``, the object's position, extent and both colours are jittered a little (within the bounds in the
    module docstring, never enough to change what the caption says); without it the canonical image is drawn.
    """
    return render_with_coverage(spec, size, rng)[0]


def render_with_coverage(spec: SceneSpec, size: int = 256,
                         rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``render``'s image and the object's coverage of each pixel, float [size, size] in [0, 1]."""
    row, col = POSITIONS[spec.position]
    cx, cy = CELL_CENTRES[col] * size, CELL_CENTRES[row] * size
    extent = SIZE_EXTENTS[spec.size] * size
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * size
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * size
        extent *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    obj = _jittered_colour(spec.colour, rng)
    background = _background(spec, _jittered_colour(spec.background, rng), size, rng)
    alpha = _coverage(spec.shape, cx, cy, extent, size)[..., None]
    image = background * (1 - alpha) + obj * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), alpha[..., 0]


# --------------------------------------------------------------------------------------
# Data sets and captions
# --------------------------------------------------------------------------------------

def iter_dataset(n: int, seed: int, size: int = 256) -> Iterator[tuple[np.ndarray, str, SceneSpec]]:
    """``n`` random (image, caption, spec) triples, the same for the same ``seed`` and ``size``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        spec = random_scene(rng)
        yield render(spec, size, rng), spec.caption(), spec


def dataset(n: int, seed: int, size: int = 256) -> list[tuple[np.ndarray, str, SceneSpec]]:
    """``iter_dataset`` as a list."""
    return list(iter_dataset(n, seed, size))


def _alternatives(words) -> str:
    """A regex group matching any of ``words``, longest first (so "top left" wins over "top")."""
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_TEXTURE_OF_WORD = {word: texture for texture, word in TEXTURES.items() if word}
_CAPTION = re.compile(
    rf"an? {_alternatives(SIZES)} {_alternatives(COLOURS)} {_alternatives(SHAPES)} "
    rf"at the {_alternatives(POSITIONS)} on an? (?:{_alternatives(_TEXTURE_OF_WORD)} )?{_alternatives(COLOURS)} "
    r"background\.?"
)


def parse_caption(text: str) -> SceneSpec | None:
    """The scene a caption describes, or None when ``text`` is not a caption in this vocabulary.

    Accepts what ``SceneSpec.caption`` writes, case- and whitespace-insensitively, with an optional final full
    stop; a caption whose background colour equals the object colour is not a valid scene (None).
    """
    match = _CAPTION.fullmatch(" ".join(text.lower().split()))
    if match is None:
        return None
    size, colour, shape, position, texture_word, background = match.groups()
    try:
        return SceneSpec(shape=shape, colour=colour, position=position, size=size, background=background,
                         texture=_TEXTURE_OF_WORD.get(texture_word, "plain"))
    except ValueError:
        return None
