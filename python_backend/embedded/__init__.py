"""The embedded default model: a small SDXL-layout (or SD 1.5) pipeline in the diffusers folder layout,
written by the project itself since nothing can be downloaded. Imports ``core`` only."""
