"""Segment engines: the UNet cut into segments (``segments``), exported to ONNX with stale buffers in
and fresh buffers out (``export``), run by ONNX Runtime or TensorRT (``runners``) as a chain
(``segmented_unet``, ``engine_set``), built and cached (``build``); the patch-parallel VAE decoder cut
into pieces at its blocking gathers (``vae_segments``); ``loader`` assembles one rank's denoiser and
slab decoder with or without engines. Imports ``core`` only."""
