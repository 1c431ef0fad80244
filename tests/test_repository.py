"""fill_repository writes configs that Triton's own ModelConfig parser reads back exactly."""

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from python_backend.serving.repository import MODELS, fill_repository
from python_backend.serving.settings import ServingSettings


def test_configs_parse_as_model_configs_and_keep_odd_paths_exact(tmp_path):
    odd = str(tmp_path / 'models "quoted" \\ back slash')
    settings = ServingSettings(model_dir=odd, ranks=2, sizes="256x256")
    fill_repository(tmp_path / "repo", settings)
    for model in MODELS:
        config = model_config_pb2.ModelConfig()
        text_format.Parse((tmp_path / "repo" / model / "config.pbtxt").read_text(), config)
        assert config.name == model
        if model == "pipeline":
            continue  # the ensemble carries no settings
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        assert parameters["model_dir"] == odd
        assert ServingSettings.from_model_config({"parameters": {
            k: {"string_value": v} for k, v in parameters.items()}}) == settings
