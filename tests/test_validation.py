"""Served request inputs and settings without a server: every bad input's message names the input and
what is allowed, defaults come from the settings, and settings survive the trip through a model config."""

import dataclasses
import json
import math

import pytest

from python_backend.serving import validation
from python_backend.serving.settings import ServingSettings
from python_backend.serving.validation import InputError

SETTINGS = ServingSettings(sizes="128x128,256x192", default_height=256, default_width=192, default_steps=7,
                           default_guidance=3.5, default_scheduler="ddim", default_seed=11, max_steps=50,
                           min_guidance=1.0, max_guidance=12.0, max_prompt_chars=20)


def _error(call) -> str:
    with pytest.raises(InputError) as error:
        call()
    return str(error.value)


# --- text inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_text_inputs_name_themselves_and_their_limits(name):
    assert _error(lambda: validation.text(name, b"\xff\xfe", SETTINGS, required=False)) == \
        f"input '{name}' must be valid UTF-8 text"
    assert _error(lambda: validation.text(name, "x" * 21, SETTINGS, required=False)) == \
        f"input '{name}' is 21 characters long; allowed: at most 20"
    assert validation.text(name, "x" * 20, SETTINGS, required=False) == "x" * 20  # the limit itself is allowed
    # Triton hands text over as UTF-8 bytes
    assert validation.text(name, "caf\u00e9".encode(), SETTINGS, required=False) == "caf\u00e9"


def test_required_prompt_must_be_present_and_not_blank():
    assert _error(lambda: validation.text("prompt", None, SETTINGS, required=True)) == \
        "input 'prompt' is required: a non-empty UTF-8 string"
    for blank in (b"", b"   ", "\n\t"):
        assert _error(lambda: validation.text("prompt", blank, SETTINGS, required=True)) == \
            "input 'prompt' must not be empty: a non-empty UTF-8 string"
    # an optional text input may be absent or empty
    assert validation.text("negative_prompt", None, SETTINGS, required=False) is None
    assert validation.text("negative_prompt", b"", SETTINGS, required=False) == ""


# --- scalar options ------------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, "input 'steps' is 0; allowed: 1 to 50"),
    ({"steps": 51}, "input 'steps' is 51; allowed: 1 to 50"),
    ({"steps": -3}, "input 'steps' is -3; allowed: 1 to 50"),
    ({"guidance_scale": 0.5}, "input 'guidance_scale' is 0.5; allowed: 1.0 to 12.0"),
    ({"guidance_scale": 12.5}, "input 'guidance_scale' is 12.5; allowed: 1.0 to 12.0"),
    ({"guidance_scale": math.nan}, "input 'guidance_scale' is nan; allowed: 1.0 to 12.0"),
    ({"guidance_scale": math.inf}, "input 'guidance_scale' is inf; allowed: 1.0 to 12.0"),
    ({"scheduler": b"lms"}, "input 'scheduler' is 'lms'; allowed: ddim, euler, euler-a, dpmpp-2m"),
    ({"scheduler": b"\xff"}, "input 'scheduler' must be valid UTF-8 text"),
    ({"seed": -1}, "input 'seed' is -1; allowed: 0 to 2^63-1"),
    ({"seed": 2**63}, f"input 'seed' is {2**63}; allowed: 0 to 2^63-1"),
    ({"height": 128}, "inputs 'height'/'width' are 128x192; allowed (built) sizes: 128x128, 256x192"),
    ({"width": 128}, "inputs 'height'/'width' are 256x128; allowed (built) sizes: 128x128, 256x192"),
    ({"height": 192, "width": 256}, "inputs 'height'/'width' are 192x256; allowed (built) sizes: 128x128, 256x192"),
])
def test_bad_option_is_named_with_its_allowed_values(values, message):
    assert _error(lambda: validation.generation(values, SETTINGS, "a cat")) == message


def test_bounds_themselves_are_allowed():
    for values in ({"steps": 1}, {"steps": 50}, {"guidance_scale": 1.0}, {"guidance_scale": 12.0}, {"seed": 0},
                   {"seed": 2**63 - 1}, {"height": 128, "width": 128}):
        validation.generation(values, SETTINGS, "a cat")


def test_defaults_come_from_the_settings():
    # Triton sends absent optional inputs as nothing at all: each default is the configured one.
    request = validation.generation({name: None for name in validation.OPTIONS}, SETTINGS, "a cat")
    assert (request.prompt, request.steps, request.guidance, request.scheduler, request.seed, request.height,
            request.width) == ("a cat", 7, 3.5, "ddim", 11, 256, 192)
    # each sent value replaces only its own default
    given = validation.generation({"steps": 3, "guidance_scale": 2.0, "scheduler": b"euler-a", "seed": 5,
                                   "height": 128, "width": 128}, SETTINGS, "a dog")
    assert (given.steps, given.guidance, given.scheduler, given.seed, given.height, given.width) == \
        (3, 2.0, "euler-a", 5, 128, 128)


def test_stock_settings_allow_the_documented_defaults():
    request = validation.generation({}, ServingSettings(), "a cat")
    assert (request.steps, request.guidance, request.scheduler, request.seed, request.height, request.width) == \
        (20, 5.0, "euler", 0, 512, 512)


# --- settings through a model config -------------------------------------------------------------


CHANGED = ServingSettings(
    model_dir="/models/my sdxl", ranks=4, mode="stale_gn", warmup_steps=0, split_cfg=False, parallel_vae=False,
    exchange_dtype="int8+residual",
    engine="onnxruntime",
    engine_dir="/engines/abc", cuda_graphs=True, device="cpu", dtype="bfloat16", sizes="1024x1024,768x1344", default_steps=30, default_guidance=7.25,
    default_scheduler="dpmpp-2m", default_seed=123456789012, default_height=768, default_width=1344, max_steps=150,
    min_guidance=0.5, max_guidance=20.0, max_prompt_chars=500, request_timeout_s=12.5, rank_timeout_s=0.25,
    max_queue_size=4, queue_timeout_s=2.5, max_request_bytes=123456, max_request_id_chars=16,
)


def _as_triton_passes(parameters: dict[str, str]) -> str:
    """``args["model_config"]``: the model config as JSON, each parameter a {"string_value": ...}."""
    return json.dumps({"name": "denoiser", "backend": "python",
                       "parameters": {k: {"string_value": v} for k, v in parameters.items()}})


def test_every_field_differs_from_its_default():
    stock = ServingSettings()
    assert [f.name for f in dataclasses.fields(CHANGED) if getattr(CHANGED, f.name) == getattr(stock, f.name)] == []


def test_settings_round_trip_through_a_model_config():
    parameters = CHANGED.as_parameters()
    assert all(isinstance(v, str) for v in parameters.values())
    assert parameters["split_cfg"] == "false" and parameters["ranks"] == "4" and parameters["rank_timeout_s"] == "0.25"
    back = ServingSettings.from_model_config(_as_triton_passes(parameters))
    assert back == CHANGED
    assert isinstance(back.ranks, int) and isinstance(back.split_cfg, bool) and isinstance(back.default_guidance, float)
    assert ServingSettings.from_model_config(json.loads(_as_triton_passes(parameters))) == CHANGED  # a dict too


def test_the_body_limit_is_sized_for_the_largest_built_size_unless_set():
    stock = ServingSettings(sizes="128x128")
    assert stock.request_body_limit() == 4 << 20  # a pipeline request is a few kB; the floor
    large = ServingSettings(sizes="1024x1024,2048x2048")
    # postprocess's decoded image at 2048^2 in binary (50 MB) must fit, twice over, plus 1 MiB
    assert large.request_body_limit() == 2 * 3 * 2048 * 2048 * 4 + (1 << 20)
    assert ServingSettings(sizes="2048x2048", max_request_bytes=1000).request_body_limit() == 1000


def test_the_server_reads_the_limit_from_a_filled_repository(tmp_path):
    from python_backend.serving.repository import fill_repository
    from python_backend.serving.server import DEFAULT_MAX_REQUEST_BYTES, repository_body_limit

    repository = fill_repository(tmp_path / "repository", CHANGED)
    assert ServingSettings.read_repository(repository) == CHANGED
    assert repository_body_limit(repository) == 123456
    assert repository_body_limit(tmp_path / "not-a-repository") == DEFAULT_MAX_REQUEST_BYTES


def test_a_filled_repository_config_reads_back_as_the_same_settings(tmp_path):
    """The real path: settings -> config.pbtxt (fill_repository) -> the JSON Triton hands the model."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from python_backend.serving.repository import fill_repository

    repository = fill_repository(tmp_path / "repository", CHANGED)  # parallel_vae false: all four Python models
    for model in ("text_encoder", "denoiser", "vae_decoder"):
        config = text_format.Parse((repository / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        as_json = json_format.MessageToJson(config, preserving_proto_field_name=True)
        assert ServingSettings.from_model_config(as_json) == CHANGED, model


def test_parameters_are_parsed_by_type_and_missing_ones_default():
    settings = ServingSettings.from_model_config(_as_triton_passes(
        {"split_cfg": "True", "ranks": "3", "default_guidance": "6", "mode": "no_sync", "unknown_key": "ignored"}))
    assert settings == dataclasses.replace(ServingSettings(), split_cfg=True, ranks=3, default_guidance=6.0,
                                           mode="no_sync")
    for text, value in (("true", True), ("1", True), ("yes", True), ("FALSE", False), ("0", False), ("no", False)):
        assert ServingSettings.from_model_config(_as_triton_passes({"split_cfg": text})).split_cfg is value, text
    assert ServingSettings.from_model_config("{}") == ServingSettings()


@pytest.mark.parametrize("name, text", [("split_cfg", "ture"), ("ranks", "two"), ("default_guidance", "high")])
def test_an_unreadable_parameter_is_named(name, text):
    with pytest.raises(ValueError, match=f"parameter '{name}'.*{text}"):
        ServingSettings.from_model_config(_as_triton_passes({name: text}))


# --- tensors between the models (issue 16) ---------------------------------------------------------


def test_tensor_shapes_are_read_from_the_model_folder(tiny_sdxl, tiny_sd15):
    from python_backend.serving.validation import TensorShapes

    assert TensorShapes.read(tiny_sdxl) == TensorShapes(tokens=77, embed_dim=64, text_embeds_dim=32, time_ids_dim=6,
                                                        latent_channels=4, vae_factor=8)
    assert TensorShapes.read(tiny_sd15) == TensorShapes(tokens=77, embed_dim=32, text_embeds_dim=1, time_ids_dim=1,
                                                        latent_channels=4, vae_factor=8)


def test_tensors_are_checked_for_shape_and_finite_values():
    import numpy as np

    from python_backend.serving.validation import InputError, TensorShapes, decoded, embeds, latents

    settings = ServingSettings(sizes="128x128,64x96")
    shapes = TensorShapes(tokens=77, embed_dim=64, text_embeds_dim=32, time_ids_dim=6, latent_channels=4, vae_factor=8)
    latents(np.zeros((1, 4, 8, 12), np.float32), settings, shapes)
    decoded(np.zeros((1, 3, 128, 128), np.float32), settings)
    good = {"prompt_embeds": np.zeros((2, 77, 64), np.float32), "text_embeds": np.zeros((2, 32), np.float32),
            "time_ids": np.zeros((2, 6), np.float32)}
    embeds(good, True, shapes)
    with pytest.raises(InputError, match=r"input 'latents' has shape \[1, 4, 256, 256\]; allowed shape: "
                                         r"\[1, 4, 16, 16\] or \[1, 4, 8, 12\]"):
        latents(np.zeros((1, 4, 256, 256), np.float32), settings, shapes)
    with pytest.raises(InputError, match="input 'decoded' holds NaN"):
        decoded(np.full((1, 3, 64, 96), np.inf, np.float32), settings)
    with pytest.raises(InputError, match=r"input 'prompt_embeds' has shape \[2, 77, 64\]; allowed shape: \[1, 77, 64\]"):
        embeds(good, False, shapes)
    with pytest.raises(InputError, match="input 'time_ids' is required"):
        embeds({**good, "time_ids": None}, True, shapes)


def test_the_queue_is_bounded_in_every_python_model(tmp_path):
    from python_backend.serving.repository import fill_repository

    fill_repository(tmp_path, ServingSettings(max_queue_size=5, queue_timeout_s=1.5))
    for model in ("text_encoder", "denoiser", "vae_decoder", "postprocess"):
        config = (tmp_path / model / "config.pbtxt").read_text()
        assert "max_queue_size: 5" in config and "default_timeout_microseconds: 1500000" in config, model
        assert "allow_timeout_override: false" in config and "timeout_action: REJECT" in config, model
        assert "TYPE_INT32" not in config, model
    assert "dynamic_batching" not in (tmp_path / "pipeline" / "config.pbtxt").read_text()
    fill_repository(tmp_path, ServingSettings(max_queue_size=0))
    assert "dynamic_batching" not in (tmp_path / "denoiser" / "config.pbtxt").read_text()
