"""What a served pipeline allows and assumes: read from a Triton model config's parameters.

``distrifusion build --repository`` writes the same values into every model of the repository, so
the text encoder and the denoiser agree on defaults (guidance decides whether the batch is guided).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from ..core import defaults
from ..core.defaults import SCHEDULERS
from ..core.devices import set_cpu_threads


@dataclass(frozen=True)
class ServingSettings:
    model_dir: str = ""
    ranks: int = 1
    mode: str = defaults.DEFAULT_MODE_NAME
    warmup_steps: int = defaults.DEFAULT_WARMUP_STEPS
    split_cfg: bool = True
    exchange_dtype: str = "native"  # how the asynchronous steps' stale buffers travel (core/exchange_codec.py)
    # With more than one rank, the denoiser's rank group decodes the image too (each rank its slab,
    # core/patch_vae.py): the ensemble passes an image, and the repository has no vae_decoder model.
    # false: rank 0's latents go to the vae_decoder model, which decodes on one device.
    parallel_vae: bool = True
    engine: str = "torch"
    engine_dir: str = ""
    cuda_graphs: bool = False  # engine tensorrt only: each segment engine replays as a CUDA graph
    device: str = "auto"
    dtype: str = "auto"  # the UNet's dtype on every rank: auto (float16 on CUDA, float32 on CPU), float32, float16, bfloat16
    sizes: str = f"{defaults.DEFAULT_HEIGHT}x{defaults.DEFAULT_WIDTH}"  # the built sizes, "HxW,HxW"
    default_steps: int = defaults.DEFAULT_STEPS
    default_guidance: float = defaults.DEFAULT_GUIDANCE  # with engines, also the build's batch: guided if > 1
    default_scheduler: str = defaults.DEFAULT_SCHEDULER
    default_seed: int = defaults.DEFAULT_SEED
    default_height: int = defaults.DEFAULT_HEIGHT
    default_width: int = defaults.DEFAULT_WIDTH
    max_steps: int = defaults.MAX_STEPS
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    # Each Python model's queue: at most this many requests wait (more are refused at once with 503
    # "Exceeds maximum queue size": busy, retry), and one waiting longer than queue_timeout_s is
    # refused with 503 "Request timeout expired". 0: an unbounded queue without a timeout.
    max_queue_size: int = 32
    queue_timeout_s: float = 300.0
    request_timeout_s: float = 600.0  # a request still denoising after this long stops at the next step
    rank_timeout_s: float = 60.0  # a rank silent this long (dead or hung) fails the request; the group restarts
    # The gateway refuses a request body larger than this (HTTP 413, gRPC RESOURCE_EXHAUSTED) before
    # tritonserver reads it. 0: sized for the deployment's largest legitimate request (request_body_limit).
    max_request_bytes: int = 0
    max_request_id_chars: int = 128  # a longer request id is refused (400 naming 'id')

    @classmethod
    def from_model_config(cls, model_config: str | dict) -> "ServingSettings":
        config = json.loads(model_config) if isinstance(model_config, str) else model_config
        raw = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        values = {}
        for f in fields(cls):
            if f.name in raw and raw[f.name] is not None:
                try:
                    values[f.name] = _parse(f.type, raw[f.name])
                except ValueError:
                    raise ValueError(f"model config parameter '{f.name}' is {raw[f.name]!r}; "
                                     f"expected {_EXPECTED[f.type]}") from None
        return cls(**values)

    def as_parameters(self) -> dict[str, str]:
        return {f.name: _format(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def read_repository(cls, repository) -> "ServingSettings | None":
        """The settings a filled repository's denoiser reads (None: not a repository of this project)."""
        from pathlib import Path

        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2

        path = Path(repository) / "denoiser" / "config.pbtxt"
        if not path.is_file():
            return None
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if "model_dir" not in config.parameters:
            return None
        return cls.from_model_config(json_format.MessageToDict(config, preserving_proto_field_name=True))

    def request_body_limit(self) -> int:
        """``max_request_bytes``, or when 0 a limit sized for the largest legitimate request: the
        largest tensor any model of the deployment takes in binary form (``postprocess``'s decoded
        image [1, 3, H, W] float32 at the largest built size) twice over plus 1 MiB for the rest, and
        at least 4 MiB (a pipeline request itself is a few kB: options and prompts)."""
        if self.max_request_bytes > 0:
            return self.max_request_bytes
        pixels = max((h * w for h, w in self.built_sizes), default=0)
        return max(4 << 20, 2 * 3 * pixels * 4 + (1 << 20))

    @property
    def decodes_on_ranks(self) -> bool:
        """Whether the rank group decodes (``parallel_vae`` with more than one rank)."""
        return self.parallel_vae and self.ranks > 1

    @property
    def built_sizes(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in size.split("x")) for size in self.sizes.split(",") if size]

    @property
    def schedulers(self) -> tuple[str, ...]:
        return SCHEDULERS


def check_denoiser_settings(s: ServingSettings, device_kind: str) -> None:
    """The denoiser's parameters that only make sense together or on some devices, checked before any
    rank starts: a ValueError naming the parameter."""
    import torch

    from ..core.devices import torch_dtype
    from ..core.exchange_codec import CodecSpec
    from ..engines.runners import EngineDeviceError, check_backend_device, check_cuda_graphs

    try:
        torch_dtype(s.dtype, torch.device(device_kind))
    except ValueError as error:
        raise ValueError(f"model config parameter 'dtype': {error}") from None
    if s.engine != "torch":
        try:
            check_backend_device(s.engine, device_kind)
        except EngineDeviceError as error:
            raise ValueError(f"model config parameter 'engine' is {s.engine!r}: {error}") from None
    if s.cuda_graphs:
        try:
            check_cuda_graphs(s.engine)
        except EngineDeviceError as error:
            raise ValueError(f"model config parameter 'cuda_graphs' is true: {error}") from None
    try:
        CodecSpec.parse(s.exchange_dtype)
    except ValueError as error:
        raise ValueError(f"model config parameter 'exchange_dtype': {error}") from None


def cpu_threads(settings: ServingSettings) -> None:
    """Every served process uses the command line's threads per rank (see ``core.devices``)."""
    set_cpu_threads(settings.ranks)


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")
_EXPECTED = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def _parse(kind: str, text: str):
    if kind == "bool":
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:  # a typo must not silently turn an option off
            raise ValueError(word)
        return word in _TRUE
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def _format(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
