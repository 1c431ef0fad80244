"""The patch-parallel algorithm: who owns which rows (``layout``), what a patch-aware layer computes
(``patch_math``), how buffers travel (``transport``, ``exchange``), which buffer a layer uses when
(``modes``, ``context``), the layers swapped into a diffusers UNet (``patch_layers``), the denoising
loop (``denoise``), the rank group (``ranks``), and the one home of defaults and rules (``defaults``,
``parallel``, ``devices``). Imports nothing from the other subpackages."""
