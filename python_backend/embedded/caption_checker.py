"""Read a one-object image back into caption attributes, without a learned model.

A text-to-image model trained on ``shapes`` data is judged by whether its images show what the prompt asked
for. This module measures that directly and deterministically: ``check(image)`` finds the object and reports
its shape, colour, 3x3 grid position and size, and the background colour, in the vocabulary of ``shapes``;
``score(image, spec)`` compares that with a scene and ``accuracy`` sums up many comparisons.

How it reads an image (every step chosen to survive noise, blur and slightly wrong colours, since the images
will come from a small diffusion model):

1. A 3x3 box blur takes the edge off per-pixel noise (repeated, up to ``MAX_EXTRA_BLURS`` times, while the
   background's noise is still high).
2. Background: a plane per colour channel (colour = a + b x + c y) fitted to the border pixels that lie near
   their median colour, so a brightness ramp is modelled and an object touching the border is ignored. The
   background colour is the named colour nearest the plane's mean.
3. Object mask: pixels whose distance from the background plane exceeds half the object's contrast (the 75th
   percentile of the clearly-different pixels' distances), at least a noise floor from the border's spread;
   only the largest 4-connected piece is kept, with its holes filled. Cutting at half contrast puts the mask
   edge where the true edge was before blurring, so areas and extents stay right.
4. Colour: the named colour nearest the per-channel median of the mask's interior (edge pixels mix with the
   background). Position: the grid cell of the mask's centroid. Size: the mask's extent (larger side of its
   bounding box) against the geometric mean of the two sizes' extents, which does not depend on the shape;
   an area threshold would mistake a large star (fill ~0.38) for a small square.
5. Shape: the radial profile of the mask's outline (distance from the centroid to the outline at each angle)
   and its Fourier harmonics 3, 4 and 5, each divided by its amplitude for the ideal triangle, square and
   star: a triangle has three lobes, a square four, a star five, a circle none. The strongest relative harmonic
   names the shape, or "circle" when none reaches ``ROUND_LIMIT``. Harmonics survive blur far better than
   corner or concavity measures: blurring a small star fills its notches, but five lobes remain.
   The bounding-box fill (circle 0.785, square 1, triangle 0.5, star ~0.38) is reported as a cross-check.

Images smaller than ``WORKING_SIDE`` are upscaled (bicubic) first so that outlines have enough pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .shapes import COLOURS, POSITIONS, SIZE_EXTENTS, SceneSpec, shape_outline

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "position", "size", "background")

MIN_CONTRAST = 20.0  # a pixel closer than this (RGB distance, levels) to the background is never object
NOISE_FLOOR_SIGMAS = 4.0  # ... nor one closer than this many times the border's noise (RGB distance)
MAX_EXTRA_BLURS = 3  # further 3x3 blurs while the noise floor exceeds twice MIN_CONTRAST
MIN_OBJECT_FRACTION = 0.001  # a mask smaller than this fraction of the image is "no object"
SIZE_THRESHOLD = math.sqrt(SIZE_EXTENTS["small"] * SIZE_EXTENTS["large"])  # extent / side between the sizes
WORKING_SIDE = 192  # smaller images are upscaled to at least this side before reading
PROFILE_BINS = 72  # angular bins of the radial profile (5 degrees each)
SHAPE_HARMONICS: dict[str, int] = {"triangle": 3, "square": 4, "star": 5}  # lobes of each non-round shape
ROUND_LIMIT = 0.3  # below this fraction of every shape's ideal harmonic, the outline is a circle


def _profile_harmonics(profile: np.ndarray) -> dict[int, float]:
    """Harmonic k -> amplitude of cos(k theta) in a radial profile, relative to the mean radius."""
    spectrum = np.abs(np.fft.rfft(profile)) / len(profile)
    return {k: float(2 * spectrum[k] / spectrum[0]) for k in SHAPE_HARMONICS.values()}


def _outline_profile(vertices: list[tuple[float, float]], bins: int) -> np.ndarray:
    """Radial profile of a polygon that is star-shaped about the origin: farthest crossing of each bin's ray."""
    v = np.array(vertices, dtype=np.float64)
    a, b = v, np.roll(v, -1, axis=0)
    theta = (np.arange(bins) + 0.5) / bins * 2 * np.pi - np.pi
    d = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [bins, 2]
    e = b - a  # [edges, 2]; solve t d = a + s e for t >= 0, 0 <= s <= 1
    cross = d[:, None, 0] * e[None, :, 1] - d[:, None, 1] * e[None, :, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (a[None, :, 0] * e[None, :, 1] - a[None, :, 1] * e[None, :, 0]) / cross
        s = (a[None, :, 0] * d[:, None, 1] - a[None, :, 1] * d[:, None, 0]) / cross
    t = np.where((np.abs(cross) > 1e-12) & (s >= 0) & (s <= 1) & (t > 0), t, 0.0)
    return t.max(axis=1)


# Shape -> the amplitude of its own harmonic in the ideal outline's radial profile (square ~0.14, triangle
# ~0.27, star ~0.32), computed from the generator's geometry so the two modules cannot drift apart.
IDEAL_HARMONICS: dict[str, float] = {
    shape: _profile_harmonics(_outline_profile(shape_outline(shape, 0.0, 0.0, 1.0), PROFILE_BINS))[k]
    for shape, k in SHAPE_HARMONICS.items()
}


@dataclass(frozen=True)
class Reading:
    """What ``check`` saw. An attribute is None when it could not be read (e.g. no object found).

    ``features`` holds the measurements behind the reading (relative harmonics, fill, extent, area fraction,
    centroid, contrast, noise, background mean), for diagnosing a wrong one.
    """

    shape: str | None
    colour: str | None
    position: str | None
    size: str | None
    background: str | None
    features: dict[str, float] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


# --------------------------------------------------------------------------------------
# Image helpers
# --------------------------------------------------------------------------------------

def _as_rgb(image) -> np.ndarray:
    """An RGB float64 array [H, W, 3] in levels 0..255 from a uint8 / float [0, 1] array or a PIL image."""
    array = np.asarray(image)
    unit_range = np.issubdtype(array.dtype, np.floating) and array.max(initial=0.0) <= 1.0
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    array = array[..., :3].astype(np.float64)
    return array * 255.0 if unit_range else array


def _working_image(rgb: np.ndarray) -> np.ndarray:
    """``rgb``, upscaled (bicubic, by a whole factor) when its shorter side is under ``WORKING_SIDE``."""
    h, w = rgb.shape[:2]
    factor = math.ceil(WORKING_SIDE / min(h, w))
    if factor <= 1:
        return rgb
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    return np.asarray(image.resize((w * factor, h * factor), Image.Resampling.BICUBIC), dtype=np.float64)


def _box_blur3(image: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication."""
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (outside the image counts as background)."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected piece of ``mask``, which must have at least one set pixel.

    Works on runs of set pixels per row: runs in adjacent rows that overlap are joined (union-find), so the
    cost grows with the number of runs, not of pixels.
    """
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    run_rows, run_starts = np.nonzero(edges == 1)
    run_ends = np.nonzero(edges == -1)[1]  # row-major order pairs every end with its start
    parent = list(range(len(run_rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_row = np.searchsorted(run_rows, np.arange(mask.shape[0] + 1))
    for row in range(1, mask.shape[0]):
        i, i_end = first_of_row[row - 1], first_of_row[row]  # runs of the row above
        j, j_end = first_of_row[row], first_of_row[row + 1]  # runs of this row
        while i < i_end and j < j_end:
            if run_starts[i] < run_ends[j] and run_starts[j] < run_ends[i]:
                parent[root(i)] = root(j)
            if run_ends[i] < run_ends[j]:  # the run that ends first cannot overlap anything further right
                i += 1
            else:
                j += 1
    roots = np.array([root(i) for i in range(len(parent))])
    sizes = np.bincount(roots, weights=run_ends - run_starts)
    keep = np.flatnonzero(roots == sizes.argmax())
    largest = np.zeros((mask.shape[0], mask.shape[1] + 1), dtype=np.int32)
    np.add.at(largest, (run_rows[keep], run_starts[keep]), 1)
    np.add.at(largest, (run_rows[keep], run_ends[keep]), -1)
    return np.cumsum(largest, axis=1)[:, :-1] > 0


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole (background not connected to the image border) filled: noise punches holes."""
    outside = _largest_component(np.pad(~mask, 1, constant_values=True))[1:-1, 1:-1]
    return ~outside


def _mask_profile(mask: np.ndarray, cy: float, cx: float, bins: int) -> np.ndarray:
    """Radial profile of the mask's outline about (cy, cx) in pixel-centre coordinates: per angular bin, the
    farthest outline pixel (plus half a pixel, to its outer edge); empty bins are interpolated."""
    ys, xs = np.nonzero(mask & ~_erode(mask))
    angle = np.arctan2(ys - cy, xs - cx)
    radius = np.hypot(ys - cy, xs - cx) + 0.5
    index = np.minimum(((angle + np.pi) / (2 * np.pi) * bins).astype(int), bins - 1)
    profile = np.zeros(bins)
    np.maximum.at(profile, index, radius)
    empty = profile == 0
    if empty.all():
        return np.ones(bins)
    if empty.any():
        positions = np.arange(bins)
        profile[empty] = np.interp(positions[empty], positions[~empty], profile[~empty], period=bins)
    return profile


def read_shape(mask: np.ndarray) -> tuple[str, dict[str, float]]:
    """The shape of a non-empty mask (step 5 of the module docstring) and its relative harmonics by shape."""
    ys, xs = np.nonzero(mask)
    harmonics = _profile_harmonics(_mask_profile(mask, ys.mean(), xs.mean(), PROFILE_BINS))
    relative = {shape: harmonics[k] / IDEAL_HARMONICS[shape] for shape, k in SHAPE_HARMONICS.items()}
    best = max(relative, key=relative.get)
    return ("circle" if relative[best] < ROUND_LIMIT else best), relative


def nearest_colour(rgb) -> str:
    """The named colour of ``shapes.COLOURS`` nearest ``rgb`` (Euclidean distance in RGB levels)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda name: float(np.sum((np.array(COLOURS[name]) - rgb) ** 2)))


def _fit_background(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(background plane [H, W, 3], its mean colour, noise sigma as an RGB distance) from the border."""
    h, w = image.shape[:2]
    b = max(2, min(h, w) // 64)
    ring = np.zeros((h, w), dtype=bool)
    ring[:b], ring[-b:], ring[:, :b], ring[:, -b:] = True, True, True, True
    ys, xs = np.nonzero(ring)
    colours = image[ring]
    median = np.median(colours, axis=0)
    near = np.linalg.norm(colours - median, axis=1) < 3 * MIN_CONTRAST
    if near.sum() < 10:  # a border with no dominant colour: fall back to all of it
        near[:] = True
    u, v = (xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1  # -1 .. 1 across the image
    design = np.stack([np.ones_like(u), u, v], axis=1)
    coef, *_ = np.linalg.lstsq(design[near], colours[near], rcond=None)
    residual = colours[near] - design[near] @ coef
    sigma = 1.4826 * np.median(np.abs(residual - np.median(residual, axis=0)), axis=0)  # per channel (MAD)
    gu = (np.arange(w) + 0.5) / w * 2 - 1
    gv = (np.arange(h) + 0.5) / h * 2 - 1
    plane = coef[0] + gu[None, :, None] * coef[1] + gv[:, None, None] * coef[2]
    return plane, coef[0], float(np.sqrt(np.sum(sigma ** 2)))


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------

def object_mask(image) -> tuple[np.ndarray, dict[str, float]]:
    """The main object's mask [H, W] bool (possibly empty), with the background's mean colour, noise and the
    object's contrast in the returned features; steps 1 to 3 of the module docstring."""
    smooth = _box_blur3(_as_rgb(image))
    plane, background, sigma = _fit_background(smooth)
    for _ in range(MAX_EXTRA_BLURS):  # heavy noise: smooth more, rather than raise the floor above the contrast
        if NOISE_FLOOR_SIGMAS * sigma <= 2 * MIN_CONTRAST:
            break
        smooth = _box_blur3(smooth)
        plane, background, sigma = _fit_background(smooth)
    distance = np.linalg.norm(smooth - plane, axis=-1)
    floor = max(MIN_CONTRAST, NOISE_FLOOR_SIGMAS * sigma)
    features = {"background_r": float(background[0]), "background_g": float(background[1]),
                "background_b": float(background[2]), "noise": sigma, "contrast": 0.0}
    different = distance > floor
    if different.sum() < MIN_OBJECT_FRACTION * distance.size:
        return np.zeros(distance.shape, dtype=bool), features
    contrast = float(np.percentile(distance[different], 75))
    features["contrast"] = contrast
    mask = _largest_component(distance > max(floor, contrast / 2))
    return _fill_holes(mask), features


def check(image) -> Reading:
    """Read the main object of ``image`` (RGB, uint8 or float in [0, 1], any size) and its background."""
    rgb = _working_image(_as_rgb(image))
    h, w = rgb.shape[:2]
    mask, features = object_mask(rgb)
    background = nearest_colour([features["background_r"], features["background_g"], features["background_b"]])
    area = int(mask.sum())
    if area < MIN_OBJECT_FRACTION * h * w:
        return Reading(None, None, None, None, background, features)

    interior = mask
    for _ in range(2):  # the pixels two steps inside the edge carry the object's own colour
        eroded = _erode(interior)
        if eroded.sum() < 10:
            break
        interior = eroded
    colour = nearest_colour(np.median(_box_blur3(rgb)[interior], axis=0))

    ys, xs = np.nonzero(mask)
    cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
    cell = (min(2, int(3 * cy)), min(2, int(3 * cx)))
    position = next(name for name, rc in POSITIONS.items() if rc == cell)

    box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    extent = max(box_w / w, box_h / h)
    size = "large" if extent > SIZE_THRESHOLD else "small"

    shape, relative = read_shape(mask)
    features.update({f"harmonic_{name}": value for name, value in relative.items()})
    features.update(fill=area / (box_h * box_w), extent=extent, area_fraction=area / (h * w),
                    centroid_x=cx, centroid_y=cy)
    return Reading(shape, colour, position, size, background, features)


def compare(reading: Reading, spec: SceneSpec) -> dict[str, bool]:
    """Attribute -> whether ``reading`` agrees with ``spec`` (texture is not an attribute: it is not read)."""
    return {name: getattr(reading, name) == getattr(spec, name) for name in ATTRIBUTES}


def score(image, spec: SceneSpec) -> dict[str, bool]:
    """Attribute -> whether ``image`` shows that attribute of ``spec``."""
    return compare(check(image), spec)


def per_attribute_accuracy(readings_vs_specs: Iterable[tuple[Reading, SceneSpec]]) -> dict[str, float]:
    """Attribute -> fraction of (reading, spec) pairs that agree on it."""
    pairs = list(readings_vs_specs)
    if not pairs:
        raise ValueError("no readings to score")
    results = [compare(reading, spec) for reading, spec in pairs]
    return {name: sum(r[name] for r in results) / len(results) for name in ATTRIBUTES}


def accuracy(readings_vs_specs: Iterable[tuple[Reading, SceneSpec]]) -> float:
    """Fraction of all attributes, over all (reading, spec) pairs, that were read right."""
    per_attribute = per_attribute_accuracy(readings_vs_specs)
    return sum(per_attribute.values()) / len(per_attribute)
