"""fill_repository writes configs that Triton's own ModelConfig parser reads back exactly."""

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from python_backend.serving.repository import MODELS, fill_repository, served_models
from python_backend.serving.settings import ServingSettings


def test_configs_parse_as_model_configs_and_keep_odd_paths_exact(tmp_path):
    odd = str(tmp_path / 'models "quoted" \\ back slash')
    settings = ServingSettings(model_dir=odd, ranks=2, sizes="256x256")
    fill_repository(tmp_path / "repo", settings)
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(served_models(settings))
    for model in served_models(settings):
        config = model_config_pb2.ModelConfig()
        text_format.Parse((tmp_path / "repo" / model / "config.pbtxt").read_text(), config)
        assert config.name == model
        if model == "pipeline":
            continue  # the ensemble carries no settings
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        assert parameters["model_dir"] == odd
        assert ServingSettings.from_model_config({"parameters": {
            k: {"string_value": v} for k, v in parameters.items()}}) == settings


def _config(path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def test_the_ensemble_decodes_where_the_settings_say(tmp_path):
    """parallel_vae with N > 1 (the default): the denoiser's rank group decodes, the ensemble maps its
    image straight to postprocess and there is no vae_decoder; otherwise rank 0's latents go to the
    vae_decoder model. Refilling a folder with the other choice leaves no stale model behind."""
    cases = [(ServingSettings(ranks=2), True), (ServingSettings(ranks=2, parallel_vae=False), False),
             (ServingSettings(ranks=1), False), (ServingSettings(ranks=2), True)]
    for settings, on_ranks in cases:
        assert settings.decodes_on_ranks is on_ranks
        repository = fill_repository(tmp_path / "repo", settings)
        models = sorted(p.name for p in repository.iterdir())
        assert ("vae_decoder" in models) is not on_ranks, models
        steps = _config(repository / "pipeline" / "config.pbtxt").ensemble_scheduling.step
        assert [s.model_name for s in steps] == (["text_encoder", "denoiser", "postprocess"] if on_ranks else
                                                 ["text_encoder", "denoiser", "vae_decoder", "postprocess"])
        denoiser_step = steps[1]
        assert dict(denoiser_step.output_map) == ({"decoded": "decoded"} if on_ranks else {"latents": "latents"})
        outputs = [o.name for o in _config(repository / "denoiser" / "config.pbtxt").output]
        assert outputs == (["latents", "decoded"] if on_ranks else ["latents"])
