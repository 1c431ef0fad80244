"""Build recipes (build/*.toml): every shipped recipe reads, and bad ones are refused naming the key."""

from pathlib import Path

import pytest

from python_backend.cli.commands import _parser
from python_backend.cli.recipes import RecipeError, apply_recipe, read_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "build").glob("*.toml"))


def _parse_with(recipe: Path, *flags: str):
    parser = _parser()
    argv = ["build", "--recipe", str(recipe), *flags]
    return apply_recipe(parser, parser.parse_args(argv), argv)


def test_the_quick_start_recipe_and_the_gpu_recipes_ship():
    names = {p.name for p in RECIPES}
    assert {"tiny-cpu.toml", "sdxl-1024-8gpu.toml", "sdxl-2048-8gpu.toml", "sd15-512-2gpu.toml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_reads_into_build_flags(recipe):
    args = _parse_with(recipe)
    values = read_recipe(recipe)
    assert args.model == values["model"] and args.height == values["height"] and args.ranks == values["ranks"]
    assert args.backend in ("torch", "onnxruntime", "tensorrt")


def test_flags_override_the_recipe_and_the_recipe_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m"\nheight = 256\nwidth = 384\nranks = 3\nsplit_cfg = false\n'
                      '[served]\nsteps = 7\nscheduler = "ddim"\n')
    args = _parse_with(recipe, "--ranks", "2")
    assert (args.height, args.width, args.ranks, args.no_split_cfg) == (256, 384, 2, True)
    assert (args.steps, args.scheduler, str(args.model)) == (7, "ddim", "m")
    assert args.mode == "corrected_async_gn"  # not in the recipe: the built-in default


@pytest.mark.parametrize("text, named", [
    ('modle = "x"\n', "'modle'"),
    ('[served]\nstep = 3\n', "'served.step'"),
    ('height = "512"\n', "'height' must be an integer"),
    ('split_cfg = 1\n', "'split_cfg' must be true or false"),
    ('backend = "tensorrtx"\n', "'backend' is 'tensorrtx'; allowed: torch, onnxruntime, tensorrt"),
    ('mode = "fast"\n', "'mode' is 'fast'"),
    ('height = \n', "not valid TOML"),
])
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path, text, named):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match=None) as error:
        _parse_with(recipe)
    assert named in str(error.value)


def test_a_missing_recipe_is_a_usage_error(tmp_path, capsys):
    from python_backend.cli import main

    assert main(["build", "--recipe", str(tmp_path / "none.toml")]) == 2
    assert "--recipe: no recipe file at" in capsys.readouterr().err


def test_split_cfg_can_be_turned_back_on_over_a_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m"\nsplit_cfg = false\n')
    assert _parse_with(recipe).no_split_cfg is True
    assert _parse_with(recipe, "--split-cfg").no_split_cfg is False
