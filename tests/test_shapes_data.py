"""The procedural captioned-image data (embedded.shapes) and its deterministic reader (embedded.caption_checker).

The data is meant for training a small text-to-image model and the reader for judging its images, so both are
held to what that needs: the same seed gives the same data, captions say exactly what the image shows, every
word of the vocabulary occurs, and the reader gets the attributes right, also after noise and blur.
"""

import dataclasses
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from python_backend.embedded import caption_checker, shapes
from python_backend.embedded.shapes import SceneSpec

CHECK_IMAGES = 200
CHECK_SEED = 2024


def degrade(image: np.ndarray, rng: np.random.Generator, sigma: float = 12.0, blur: float = 1.0) -> np.ndarray:
    """A mild Gaussian blur (radius ``blur`` px), then Gaussian noise of ``sigma`` levels (12/255 by default)."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    return np.clip(np.rint(blurred + rng.normal(0.0, sigma, blurred.shape)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def checked_data():
    return shapes.dataset(CHECK_IMAGES, seed=CHECK_SEED)


# --------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------

def test_the_same_seed_gives_the_same_data_and_another_seed_other_data():
    first, again, other = shapes.dataset(12, seed=5), shapes.dataset(12, seed=5), shapes.dataset(12, seed=6)
    for (image, caption, spec), (image2, caption2, spec2) in zip(first, again):
        assert image.tobytes() == image2.tobytes() and caption == caption2 and spec == spec2
    assert [c for _, c, _ in first] != [c for _, c, _ in other]
    assert any(a.tobytes() != b.tobytes() for (a, _, _), (b, _, _) in zip(first, other))
    iterated = list(shapes.iter_dataset(12, seed=5))
    assert all(a.tobytes() == b.tobytes() for (a, _, _), (b, _, _) in zip(first, iterated))


def test_images_are_square_uint8_rgb():
    for image, _, _ in shapes.dataset(8, seed=1):
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    image, _, _ = shapes.dataset(1, seed=1, size=64)[0]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_a_render_without_a_generator_is_canonical():
    spec = SceneSpec("square", "green", "bottom right", "large", "white", "noise")
    canonical = shapes.render(spec)
    assert canonical.tobytes() == shapes.render(spec).tobytes()
    assert canonical.tobytes() != shapes.render(spec, rng=np.random.default_rng(0)).tobytes()


def test_the_coverage_is_the_objects_share_of_each_pixel():
    spec = SceneSpec("star", "yellow", "center", "small", "purple", "gradient")
    image, coverage = shapes.render_with_coverage(spec, rng=np.random.default_rng(3))
    assert image.tobytes() == shapes.render(spec, rng=np.random.default_rng(3)).tobytes()  # the same draw
    assert coverage.shape == (256, 256) and coverage.min() == 0.0 and coverage.max() == 1.0
    inside, outside = image[coverage == 1].astype(int), image[coverage == 0].astype(int)
    yellow, purple = np.array(shapes.COLOURS["yellow"]), np.array(shapes.COLOURS["purple"])
    assert np.abs(inside - yellow).max() <= shapes.COLOUR_JITTER
    assert np.abs(outside - purple).max() <= shapes.COLOUR_JITTER + shapes.GRADIENT_AMPLITUDE + 1
    extent = shapes.SIZE_EXTENTS["small"] * 256  # a star fills about 0.38 of its bounding box
    assert 0.25 * extent**2 < coverage.sum() < 0.5 * extent**2


def test_the_object_is_where_and_what_the_caption_says():
    spec = SceneSpec("circle", "red", "top left", "large", "blue")
    image = shapes.render(spec)
    centre = int(shapes.CELL_CENTRES[0] * 256)
    assert tuple(image[centre, centre]) == shapes.COLOURS["red"]
    assert tuple(image[0, 0]) == tuple(image[255, 255]) == shapes.COLOURS["blue"]  # plain background
    assert tuple(image[128, 128]) == shapes.COLOURS["blue"]  # nothing drawn in the centre cell
    radius = shapes.SIZE_EXTENTS["large"] * 256 / 2
    assert tuple(image[centre, int(centre + radius + 2)]) == shapes.COLOURS["blue"]
    assert tuple(image[centre, int(centre + radius - 2)]) == shapes.COLOURS["red"]


def test_every_vocabulary_item_is_reachable():
    rng = np.random.default_rng(0)
    specs = [shapes.random_scene(rng) for _ in range(400)]
    assert {s.shape for s in specs} == set(shapes.SHAPES)
    assert {s.colour for s in specs} == set(shapes.COLOURS)
    assert {s.background for s in specs} == set(shapes.COLOURS)
    assert {s.position for s in specs} == set(shapes.POSITIONS)
    assert {s.size for s in specs} == set(shapes.SIZES)
    assert {s.texture for s in specs} == set(shapes.TEXTURES)
    assert all(s.background != s.colour for s in specs)


def test_the_vocabulary_colours_are_far_apart():
    names = list(shapes.COLOURS)
    gaps = [np.linalg.norm(np.subtract(shapes.COLOURS[a], shapes.COLOURS[b]))
            for a, b in itertools.combinations(names, 2)]
    assert len(names) == 8 and min(gaps) > 70


def test_a_scene_rejects_unknown_words_and_an_invisible_object():
    with pytest.raises(ValueError, match="shape"):
        SceneSpec("hexagon", "red", "top", "small", "blue")
    with pytest.raises(ValueError, match="position"):
        SceneSpec("circle", "red", "middle", "small", "blue")
    with pytest.raises(ValueError, match="differ"):
        SceneSpec("circle", "red", "top", "small", "red")


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

def test_captions_read_as_described():
    assert (SceneSpec("circle", "red", "top left", "large", "blue").caption()
            == "a large red circle at the top left on a blue background")
    assert (SceneSpec("star", "green", "center", "small", "orange", "noise").caption()
            == "a small green star at the center on a grainy orange background")
    assert (SceneSpec("square", "white", "bottom", "small", "orange").caption()
            == "a small white square at the bottom on an orange background")


def test_every_caption_parses_back_to_its_scene():
    captions = set()
    for shape, colour, position, size, background, texture in itertools.product(
            shapes.SHAPES, shapes.COLOURS, shapes.POSITIONS, shapes.SIZES, shapes.COLOURS, shapes.TEXTURES):
        if background == colour:
            continue
        spec = SceneSpec(shape, colour, position, size, background, texture)
        assert shapes.parse_caption(spec.caption()) == spec, spec.caption()
        captions.add(spec.caption())
    assert len(captions) == 4 * 8 * 9 * 2 * 7 * 3  # distinct scenes have distinct captions


def test_parse_caption_is_lenient_about_form_and_strict_about_words():
    spec = SceneSpec("triangle", "purple", "top right", "small", "yellow", "gradient")
    assert shapes.parse_caption("  A small PURPLE triangle at the top  right on a shaded yellow background.") == spec
    for text in ("", "a photo of an astronaut riding a horse",
                 "a small purple hexagon at the top right on a yellow background",
                 "a small purple triangle at the top right on a yellow background with a dog",
                 "a small purple triangle at the top right on a purple background"):
        assert shapes.parse_caption(text) is None, text


# --------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------

def test_the_checker_reads_clean_images(checked_data):
    pairs = [(caption_checker.check(image), spec) for image, _, spec in checked_data]
    per_attribute = caption_checker.per_attribute_accuracy(pairs)
    overall = caption_checker.accuracy(pairs)
    print(f"clean: accuracy {overall:.4f} {per_attribute}")
    assert overall >= 0.97
    assert min(per_attribute.values()) >= 0.9, per_attribute  # no attribute hides behind the others


def test_the_checker_reads_noisy_blurred_images(checked_data):
    rng = np.random.default_rng(7)
    pairs = [(caption_checker.check(degrade(image, rng)), spec) for image, _, spec in checked_data]
    per_attribute = caption_checker.per_attribute_accuracy(pairs)
    overall = caption_checker.accuracy(pairs)
    print(f"noisy (sigma 12/255, blur radius 1): accuracy {overall:.4f} {per_attribute}")
    assert overall >= 0.90
    assert min(per_attribute.values()) >= 0.8, per_attribute


@pytest.mark.parametrize("attribute, wrong", [("shape", "star"), ("colour", "yellow"), ("position", "center"),
                                              ("size", "large"), ("background", "black")])
def test_the_checker_flags_the_attribute_an_image_lacks(attribute, wrong):
    spec = SceneSpec("square", "blue", "bottom left", "small", "white", "gradient")
    image = shapes.render(spec, rng=np.random.default_rng(3))
    assert all(caption_checker.score(image, spec).values())
    other = dataclasses.replace(spec, **{attribute: wrong})
    result = caption_checker.score(image, other)
    assert result == {name: name != attribute for name in caption_checker.ATTRIBUTES}


def test_the_checker_finds_no_object_in_an_empty_image():
    reading = caption_checker.check(np.full((256, 256, 3), shapes.COLOURS["green"], dtype=np.uint8))
    assert (reading.shape, reading.colour, reading.position, reading.size) == (None, None, None, None)
    assert reading.background == "green"
    assert caption_checker.accuracy([(reading, SceneSpec("circle", "red", "top", "small", "green"))]) == 0.2


def test_the_checker_accepts_float_and_small_images():
    image, _, spec = shapes.dataset(1, seed=9)[0]
    assert all(caption_checker.score(image.astype(np.float32) / 255.0, spec).values())
    small, _, small_spec = shapes.dataset(1, seed=9, size=64)[0]
    assert all(caption_checker.score(small, small_spec).values())
