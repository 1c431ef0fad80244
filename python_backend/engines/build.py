"""``distrifusion build``: a model folder -> per-rank ONNX segments (-> TensorRT engines), cached.

The cache key covers everything the result depends on: the UNet's weights and config, resolution,
rank layout, batch, mode, cut, backend, precision and tool versions (and the GPU for TensorRT), and,
where every rank decodes its slab (``parallel_vae`` with N > 1), the VAE's weights and the decoder's
slabs: those builds also hold each rank's VAE decoder pieces under ``vae/rank{r}`` (float32). A
second identical build finds ``build.json`` under its key and reuses everything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..core.layout import PatchLayout
from ..core.model import ModelInfo, load_pipeline
from ..core.modes import DEFAULT_MODE, Mode
from ..core.parallel import group_shape

log = logging.getLogger("distrifusion.build")

DEFAULT_OUT = Path("build/out/engines")


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # --precision -> the graphs' dtype


@dataclass(frozen=True)
class BuildRequest:
    model: str
    height: int
    width: int
    ranks: int
    backend: str = "onnxruntime"
    precision: str = "fp32"
    mode: str = DEFAULT_MODE.value
    split_cfg: bool = True
    guided: bool = True
    num_images: int = 1
    cut: str | None = None
    parallel_vae: bool = False  # also build each rank's VAE decoder pieces (with more than one rank)

    def patches_and_batch(self) -> tuple[int, int]:
        """Slabs per patch group and the UNet batch on each rank."""
        shape = group_shape(self.ranks, self.guided, self.split_cfg, self.num_images)
        return shape.patches, shape.batch


def weights_digest(model: Path, component: str = "unet") -> str:
    """sha256 over a component folder's files (config and weights)."""
    digest = hashlib.sha256()
    for path in sorted((model / component).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def tool_versions(backend: str) -> dict[str, str]:
    import diffusers
    import onnx

    from .export import EXPORT_FORMAT, OPSET

    versions = {"distrifusion": __version__, "export_format": str(EXPORT_FORMAT), "opset": str(OPSET),
                "torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__}
    if backend == "onnxruntime":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    else:
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def cache_key(request: BuildRequest) -> tuple[str, dict]:
    info = ModelInfo.read(request.model)
    patches, batch = request.patches_and_batch()
    layout = PatchLayout.split(request.height // info.vae_scale, patches, info.downsampling_factor)
    fields = {
        "weights": weights_digest(info.path), "height": request.height, "width": request.width,
        "units": list(layout.units), "batch": batch, "mode": request.mode, "cut": request.cut,
        "backend": request.backend, "precision": request.precision, "versions": tool_versions(request.backend),
        "decoder": decoder_fields(request, info),
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return key, fields


def decoder_fields(request: BuildRequest, info: ModelInfo) -> dict | None:
    """What the decoder pieces depend on, or None where the build has none (one rank, or no parallel VAE)."""
    if not (request.parallel_vae and request.ranks > 1):
        return None
    from .vae_segments import VAE_EXPORT_FORMAT

    latents = [request.num_images, info.latent_channels, request.height // info.vae_scale,
               request.width // info.vae_scale]
    return {"vae": weights_digest(info.path, "vae"), "ranks": request.ranks, "latents": latents,
            "unit_rows": info.downsampling_factor, "format": VAE_EXPORT_FORMAT}


def build(request: BuildRequest, out: Path = DEFAULT_OUT, force: bool = False, progress: bool = True,
          device: str | torch.device | None = None) -> Path:
    """Exports (and compiles) every rank's segments unless the cache has them; returns the build folder.

    ``device``: where the ranks that will load this build run, when the caller knows (a device kind, "auto"
    or a name); a backend that cannot feed them is refused before any work (``check_backend_device``)."""
    if device is not None:
        from .runners import check_backend_device

        check_backend_device(request.backend, device)
    started = time.perf_counter()
    key, fields = cache_key(request)
    folder = out / key
    if (folder / "build.json").is_file() and not force:
        log.info("cache hit: reusing the build %s at %s (nothing exported or compiled)", key, folder)
        return folder
    log.info("building %s: %dx%d, %d rank(s), %s, %s, %s -> %s", request.model, request.height, request.width,
             request.ranks, request.mode, request.backend, request.precision, folder)
    from tqdm import tqdm

    from .export import ExportSpec, SegmentExporter

    # the graphs are exported in the engine precision (fp16 weights and I/O; GroupNorm moments stay float32
    # inside, see patch_math), so that TensorRT builds them strongly typed
    pipe = load_pipeline(request.model, torch.device("cpu"), EXPORT_DTYPES[request.precision])
    exporter = SegmentExporter(pipe, tuple(fields["units"]), Mode(request.mode), request.cut)
    patches = len(fields["units"])
    per_rank = exporter.graphs_per_rank
    bar = tqdm(total=patches * per_rank * (2 if request.backend == "tensorrt" else 1), desc="exporting",
               unit="graph", file=sys.stderr, disable=not progress)
    for index in range(patches):
        rank_dir = folder / f"patch{index}"
        spec = ExportSpec(request.height, request.width, fields["batch"], tuple(fields["units"]), index)
        manifest = exporter.export(spec, rank_dir, progress=lambda name: bar.update(1))
        (rank_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if request.backend == "tensorrt":
            from .runners import build_tensorrt_engine

            bar.set_description("compiling TensorRT engines")
            for onnx_file in sorted(rank_dir.glob("*.onnx")):
                build_tensorrt_engine(onnx_file, onnx_file.with_suffix(".plan"), folder / "timing.cache")
                bar.update(1)
    bar.close()
    if fields["decoder"] is not None:
        _build_decoders(request, fields["decoder"], folder, progress)
    seconds = time.perf_counter() - started
    (folder / "build.json").write_text(json.dumps({"key": key, "request": asdict(request), "fields": fields,
                                                   "seconds": round(seconds, 2)}, indent=1))
    log.info("built %s in %.1f s", key, seconds)
    return folder


def _build_decoders(request: BuildRequest, fields: dict, folder: Path, progress: bool) -> None:
    """Every rank's VAE decoder pieces (float32), compiled for TensorRT where asked."""
    from tqdm import tqdm

    from .vae_segments import export_every_rank

    with tqdm(total=fields["ranks"], desc="exporting every rank's VAE decoder pieces", unit="rank",
              file=sys.stderr, disable=not progress) as bar:
        manifests = export_every_rank(request.model, tuple(fields["latents"]), fields["ranks"], fields["unit_rows"],
                                      folder / "vae", progress=lambda done, total: bar.update(1))
    program = manifests[0]["program"]
    log.info("VAE decoder: %d pieces per rank between %d blocking gathers", sum(1 for e in program if "file" in e),
             sum(1 for e in program if "gather" in e))
    if request.backend == "tensorrt":
        from .runners import build_tensorrt_engine

        for onnx_file in tqdm(sorted((folder / "vae").glob("rank*/*.onnx")), desc="compiling the decoder pieces",
                              unit="engine", file=sys.stderr, disable=not progress):
            build_tensorrt_engine(onnx_file, onnx_file.with_suffix(".plan"), folder / "timing.cache")
