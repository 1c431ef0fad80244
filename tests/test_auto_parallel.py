"""``--parallel auto``: the cost model's choices on a table of cases, its figures against the docs, bad
inputs, and the command line (build, generate, recipes)."""

import json
import re
from argparse import Namespace
from types import SimpleNamespace

import pytest

from python_backend.cli import main
from python_backend.cli.commands import _parser
from python_backend.cli.parallel_option import ParallelOptionError, resolve_parallel
from python_backend.cli.recipes import RecipeError, apply_recipe
from python_backend.core import auto_parallel
from python_backend.core.auto_parallel import (
    FIGURES,
    INTERCONNECTS,
    SPARSE_COMPUTE_RATIOS,
    AutoParallelInputs,
    ModelFigures,
    choose_parallel,
    estimate_layout,
    interconnect_from_text,
    received_mib,
    slab_compute_ratio,
    with_measured_step,
)
from python_backend.core.defaults import DEFAULT_WARMUP_STEPS
from python_backend.core.parallel import group_shape

PCIE = INTERCONNECTS["pcie"]

# (case, inputs, (ranks, split_cfg, patches, warm-up), what the explanation must say)
CASES = [
    ("2 NVLink GPUs at 1024², guided: CFG split only, exact, no warm-up",
     dict(gpus=2, height=1024, width=1024, guided=True),
     (2, True, 1, 0),
     ["chose CFG split only on 2 GPUs", "rejected 2 patches on 2 GPUs", "415.6 MiB", "nothing is stale"]),
    ("8 NVLink GPUs at 1024², guided: both",
     dict(gpus=8, height=1024, width=1024, guided=True),
     (8, True, 4, 4),
     ["CFG split + 4 patches per guidance half on 8 GPUs", "315.6 MiB", "hidden behind the compute"]),
    ("8 NVLink GPUs at 4096², guided: both (half the bytes of 8 patches)",
     dict(gpus=8, height=4096, width=4096, guided=True),
     (8, True, 4, 4),
     ["CFG split + 4 patches per guidance half on 8 GPUs", "4862.5 MiB", "rejected 8 patches on 8 GPUs",
      "11325.0 MiB"]),
    ("unguided: patches only",
     dict(gpus=4, height=2048, width=2048, guided=False),
     (4, False, 4, 4),
     ["chose 4 patches on 4 GPUs", "unguided", "no CFG halves to split"]),
    ("one GPU: nothing to split",
     dict(gpus=1, height=1024, width=1024, guided=True),
     (1, False, 1, 0),
     ["chose one GPU", "nothing to split"]),
    ("8 GPUs over PCIe at 1024²: fewer patches, fewer GPUs",
     dict(gpus=8, height=1024, width=1024, guided=True, interconnect=PCIE),
     (6, True, 3, 4),
     ["CFG split + 3 patches per guidance half on 6 GPUs", "16 GB/s", "282.3 MiB",
      "rejected CFG split + 4 patches per guidance half on 8 GPUs", "315.6 MiB",
      "ms of it exposed in every asynchronous step", "uses 6 of the 8 GPUs given"]),
    ("8 GPUs over PCIe with int8+residual: half the bytes in asynchronous steps, so all 8 GPUs pay",
     dict(gpus=8, height=1024, width=1024, guided=True, interconnect=PCIE, exchange_dtype="int8+residual"),
     (8, True, 4, 4),
     ["CFG split + 4 patches per guidance half on 8 GPUs", "exchange int8+residual: asynchronous steps send 0.5x"]),
    ("PCIe and every step synchronous (full_sync): CFG split only",
     dict(gpus=8, height=1024, width=1024, guided=True, interconnect=PCIE, all_steps_synchronous=True),
     (2, True, 1, 0),
     ["CFG split only on 2 GPUs", "every step is synchronous", "20 synchronous step(s)"]),
    ("--no-split-cfg: patches only even where the split would win",
     dict(gpus=2, height=1024, width=1024, guided=True, allow_cfg_split=False),
     (2, False, 2, 4),
     ["chose 2 patches on 2 GPUs", "CFG split excluded"]),
    ("a small image on 8 GPUs: the fixed overhead dominates, the exact split wins",
     dict(gpus=8, height=128, width=128, guided=True),
     (2, True, 1, 0),
     ["CFG split only on 2 GPUs", "at most 4 patches per patch group", "uses 2 of the 8 GPUs given"]),
    ("unguided 3072² over PCIe on 4 GPUs: 4 patches are within 3 % of 3, so 3 GPUs do",
     dict(gpus=4, height=3072, width=3072, guided=False, interconnect=PCIE),
     (3, False, 3, 4),
     ["chose 3 patches on 3 GPUs", "4 patches on 4 GPUs is estimated at", "within 3%"]),
    ("few steps: one warm-up step",
     dict(gpus=4, height=2048, width=2048, guided=False, steps=5),
     (4, False, 4, 1),
     ["warm-up: 1 of 5 steps"]),
    ("a given warm-up is kept",
     dict(gpus=4, height=2048, width=2048, guided=False, warmup_steps=2),
     (4, False, 4, 2),
     ["warm-up: 2 step(s), as given"]),
    ("SD 1.5 at 512² on 2 GPUs: CFG split only",
     dict(gpus=2, height=512, width=512, guided=True, figures=FIGURES["sd"]),
     (2, True, 1, 0),
     ["sd figures", "CFG split only on 2 GPUs"]),
]


@pytest.mark.parametrize("case, inputs, expected, mentions", CASES, ids=[c[0] for c in CASES])
def test_the_choice_and_its_reasons(case, inputs, expected, mentions):
    choice = choose_parallel(AutoParallelInputs(**inputs))
    assert (choice.ranks, choice.split_cfg, choice.patches, choice.warmup_steps) == expected, choice.explain()
    text = choice.explain()
    for words in mentions:
        assert words in text, f"{words!r} not in:\n{text}"
    assert f"~{choice.estimated_step_ms:.1f} ms/step" in text
    assert text.count(" * |") == 1  # the chosen row is marked in the table


def test_the_exposed_exchange_printed_is_the_estimate_of_the_rejected_layout():
    choice = choose_parallel(AutoParallelInputs(gpus=8, height=1024, width=1024, guided=True, interconnect=PCIE))
    on_eight = min((e for e in choice.table if e.ranks == 8), key=lambda e: e.mean_step_ms)
    assert on_eight.exposed_ms > 1 and on_eight.mean_step_ms > choice.estimated_step_ms
    assert f"{on_eight.exposed_ms:.1f} ms of it exposed in every asynchronous step" in choice.explain()


def test_every_candidate_follows_the_cfg_split_rule_and_fits_the_height():
    inputs = AutoParallelInputs(gpus=8, height=128, width=256, guided=True, num_images=2)
    table = choose_parallel(inputs).table
    assert {e.ranks for e in table} == set(range(1, 9)) - {5, 7}  # 5 or 7 slabs of 128 rows do not fit
    for e in table:
        shape = group_shape(e.ranks, True, e.split_cfg, 2)
        assert (e.split_cfg, e.patches, e.batch_per_rank) == (shape.split, shape.patches, shape.batch)
        assert e.patches <= 128 // 32


@pytest.mark.parametrize("patches, batch, documented_total_mib", [
    (2, 2, 415.77), (4, 2, 631.50), (8, 2, 731.63), (2, 1, 208.01), (4, 1, 315.88), (8, 1, 365.94),
])
def test_bytes_per_step_reproduce_docs_communication(patches, batch, documented_total_mib):
    """K/V + halos are the model's bytes; the documented totals add GroupNorm moments and the output
    gather (under 0.5 MiB)."""
    inputs = AutoParallelInputs(gpus=8, height=1024, width=1024, guided=True)
    assert 0 <= documented_total_mib - received_mib(inputs, patches, batch) < 0.5


def test_the_compute_ratio_is_fitted_to_docs_sparse_compute():
    assert 0 <= auto_parallel.SPARSE_OVERHEAD < 0.02
    for n, measured in SPARSE_COMPUTE_RATIOS.items():
        assert slab_compute_ratio(n, 32) == pytest.approx(measured, abs=0.02)
    assert slab_compute_ratio(3, 32) > 11 / 32  # the largest of unequal slabs (11, 11, 10 units) sets the pace


def test_asynchronous_steps_hide_the_exchange_and_warm_up_steps_pay_it():
    inputs = AutoParallelInputs(gpus=2, height=1024, width=1024, guided=False, interconnect=PCIE)
    estimate = estimate_layout(inputs, 2, False, warmup_steps=4)
    assert estimate.comm_ms > 0 and estimate.exposed_ms == max(0.0, estimate.comm_ms - estimate.compute_ms)
    assert estimate.sync_step_ms == pytest.approx(estimate.compute_ms + estimate.comm_ms + estimate.gather_ms)
    assert estimate.mean_step_ms == pytest.approx((4 * estimate.sync_step_ms + 16 * estimate.async_step_ms) / 20)


def test_a_measured_step_replaces_the_assumed_one():
    figures = with_measured_step(FIGURES["sdxl"], 2048, 2048, 500.0)
    inputs = AutoParallelInputs(gpus=1, height=2048, width=2048, guided=True, figures=figures)
    assert choose_parallel(inputs).estimated_step_ms == pytest.approx(500.0)


@pytest.mark.parametrize("inputs, message", [
    (dict(gpus=0), "gpus must be an integer in [1, 256], got 0"),
    (dict(gpus=2.0), "gpus must be an integer in [1, 256], got 2.0"),
    (dict(height=1000), "height must be a positive multiple of 32 (the model's slab unit), got 1000"),
    (dict(width=0), "width must be a positive multiple of 8, got 0"),
    (dict(steps=0), "steps must be an integer in [1, 200], got 0"),
    (dict(num_images=0), "num_images must be an integer in [1, 64], got 0"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer in [0, 200], got -1"),
])
def test_bad_inputs_name_the_field_and_the_range(inputs, message):
    with pytest.raises(ValueError) as error:
        AutoParallelInputs(**{**dict(gpus=2, height=1024, width=1024, guided=True), **inputs})
    assert message in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("fast", "interconnect must be one of nvlink, pcie or a bandwidth in GB/s > 0, got 'fast'"),
    ("0", "got '0'"), ("-3", "got '-3'"), ("nan", "got 'nan'"),
])
def test_bad_interconnects_are_refused(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        interconnect_from_text(text)


def test_interconnect_presets_and_numbers():
    assert interconnect_from_text("pcie") is PCIE
    assert interconnect_from_text("50").gbytes_per_s == 50.0


def test_bad_model_figures_name_the_field():
    with pytest.raises(ValueError, match=r"fixed_ms must be a number in \[0, 10\), got 10"):
        ModelFigures(family="x", reference_height=512, reference_width=512, step_ms=10, fixed_ms=10,
                     attention_share=0.1, kv_mib_per_image=1, halo_mib_per_image=1, layer_collectives=1,
                     row_unit_px=32)


def test_the_entry_point_prints_the_table_and_the_reasons(capsys):
    assert auto_parallel.main(["--gpus", "8", "--height", "1024", "--width", "1024", "--interconnect", "pcie"]) == 0
    out = capsys.readouterr().out
    assert "chose CFG split + 3 patches per guidance half on 6 GPUs" in out and "| mean ms/step" in out
    assert auto_parallel.main(["--gpus", "0"]) == 2
    assert "gpus must be an integer in [1, 256], got 0" in capsys.readouterr().err


# --- the command line --------------------------------------------------------------------------------

SDXL_INFO = SimpleNamespace(family="sdxl", vae_scale=8, downsampling_factor=4)


def _args(**values):
    base = dict(ranks=8, height=1024, width=1024, guidance=5.0, num_images=1, steps=20, warmup_steps=None,
                no_split_cfg=False, mode="corrected_async_gn", parallel=None, interconnect=None)
    return Namespace(**{**base, **values})


def test_auto_sets_the_ranks_the_split_and_the_warm_up():
    args = _args(parallel="auto", interconnect="pcie")
    text = resolve_parallel(args, SDXL_INFO)
    assert (args.ranks, args.no_split_cfg, args.warmup_steps) == (6, False, 4)
    assert "uses 6 of the 8 GPUs given" in text


def test_auto_keeps_a_given_warm_up_and_honours_no_split_cfg():
    args = _args(parallel="auto", ranks=2, warmup_steps=3, no_split_cfg=True)
    resolve_parallel(args, SDXL_INFO)
    assert (args.ranks, args.no_split_cfg, args.warmup_steps) == (2, True, 3)


def test_without_parallel_nothing_changes():
    args = _args()
    assert resolve_parallel(args, SDXL_INFO) is None
    assert (args.ranks, args.no_split_cfg, args.warmup_steps) == (8, False, DEFAULT_WARMUP_STEPS)


@pytest.mark.parametrize("values, expected", [
    (dict(parallel="patches"), (8, True)),
    (dict(parallel="cfg", ranks=2), (2, False)),
    (dict(parallel="both"), (8, False)),
])
def test_stated_layouts(values, expected):
    args = _args(**values)
    resolve_parallel(args, SDXL_INFO)
    assert (args.ranks, args.no_split_cfg) == expected


@pytest.mark.parametrize("values, message", [
    (dict(parallel="cfg"), "--parallel cfg runs one guidance half per GPU: it needs --ranks 2, got 8"),
    (dict(parallel="both", ranks=5), "--parallel both needs an even --ranks >= 4"),
    (dict(parallel="both", guidance=1.0), "--parallel both splits the guidance halves: it needs --guidance > 1"),
    (dict(parallel="cfg", ranks=2, no_split_cfg=True), "--parallel cfg contradicts --no-split-cfg"),
    (dict(interconnect="pcie"), "--interconnect applies only with --parallel auto"),
    (dict(parallel="auto", interconnect="fast"), "--interconnect must be nvlink, pcie or a bandwidth in GB/s"),
    (dict(parallel="auto", num_images=100), "--parallel auto: num_images must be an integer in [1, 64], got 100"),
])
def test_bad_combinations_name_the_flags(values, message):
    with pytest.raises(ParallelOptionError) as error:
        resolve_parallel(_args(**values), SDXL_INFO)
    assert message in str(error.value)


@pytest.fixture
def sdxl_configs(tmp_path):
    """A folder with an SDXL pipeline's configs only: enough for the checks and a repository."""
    folder = tmp_path / "sdxl-configs"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (folder / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [320, 640, 1280]}))
    (folder / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    return folder


def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def _served_parameters(repository) -> dict:
    text = (repository / "denoiser" / "config.pbtxt").read_text()
    return dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))


def test_build_parallel_auto_prints_why_and_serves_the_choice(sdxl_configs, tmp_path, capsys):
    repository = tmp_path / "repository"
    assert _run(["build", "--model", str(sdxl_configs), "--backend", "torch", "--height", "1024", "--width", "1024",
                 "--ranks", "8", "--parallel", "auto", "--interconnect", "pcie", "--repository", str(repository)]) == 0
    out = capsys.readouterr().out
    assert "chose CFG split + 3 patches per guidance half on 6 GPUs" in out and "16 GB/s" in out
    served = _served_parameters(repository)
    assert (served["ranks"], served["split_cfg"], served["warmup_steps"]) == ("6", "true", "4"), served


def test_build_recipe_takes_parallel_auto(sdxl_configs, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{sdxl_configs}"\nheight = 1024\nwidth = 1024\nranks = 2\nparallel = "auto"\n'
                      f'interconnect = "pcie"\n')
    parser = _parser()
    argv = ["build", "--recipe", str(recipe)]
    args = apply_recipe(parser, parser.parse_args(argv), argv)
    assert (args.parallel, args.interconnect, args.warmup_steps) == ("auto", "pcie", None)
    recipe.write_text('parallel = "fastest"\n')
    with pytest.raises(RecipeError, match="'parallel' is 'fastest'; allowed: auto, patches, cfg, both"):
        apply_recipe(parser, parser.parse_args(argv), argv)


def test_generate_parses_parallel_auto_and_refuses_bad_values(sdxl_configs, capsys):
    generate = ["generate", "--model", str(sdxl_configs), "--prompt", "a cat", "--out", "unused.png"]
    args = _parser().parse_args([*generate, "--parallel", "auto", "--interconnect", "40"])
    assert (args.parallel, args.interconnect) == ("auto", "40")
    assert _run([*generate, "--parallel", "fastest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --parallel: invalid choice: 'fastest'" in err and "auto" in err and "both" in err
    assert _run([*generate, "--parallel", "cfg", "--ranks", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distrifusion generate: error: --parallel cfg runs one guidance half per GPU: it needs --ranks 2, "
                   "got 4 (--parallel both splits more GPUs into two patch groups)"]


def test_an_unknown_exchange_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="exchange_dtype must be one of native, float16, bfloat16, int8, int4"):
        AutoParallelInputs(gpus=2, height=1024, width=1024, guided=True, exchange_dtype="int3")
