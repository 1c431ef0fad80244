"""The segment engines of one build, as the denoising loop's ``StepEngines``."""

from __future__ import annotations

from pathlib import Path

from ..core.denoise import GenerationRequest, UNetStep
from ..core.layout import PatchLayout
from ..core.ranks import PatchPlan


class EngineSet:
    """Loads each slab index's ``SegmentedUNet`` on first use and checks it fits the generation."""

    def __init__(self, folder, backend: str, cuda_graphs: bool = False):
        self.folder, self.backend, self.cuda_graphs = Path(folder), backend, cuda_graphs
        if not (self.folder / "build.json").is_file():
            raise FileNotFoundError(f"no complete {backend} build at {self.folder}; run `distrifusion build` first")
        self.loaded = {}

    def for_generation(self, plan: PatchPlan, layout: PatchLayout, request: GenerationRequest) -> UNetStep:
        from .segmented_unet import SegmentedUNet

        if plan.index not in self.loaded:
            self.loaded[plan.index] = SegmentedUNet(self.folder / f"patch{plan.index}", self.backend, self.cuda_graphs)
        engine = self.loaded[plan.index]
        built = engine.manifest
        batch = request.num_images * (2 if request.guided and plan.branch is None else 1)
        wanted = {"units": list(layout.units), "height": request.height, "width": request.width, "batch": batch}
        have = {k: built[k] for k in wanted}
        if have != wanted:
            raise ValueError(f"the engines at {self.folder} were built for {have}, this generation needs {wanted}")
        engine.begin_generation()
        return engine
