"""Segment engines: the UNet cut into segments (``segments``), exported to ONNX with stale buffers in
and fresh buffers out (``export``), run by ONNX Runtime or TensorRT (``runners``) as a chain
(``segmented_unet``, ``engine_set``), built and cached (``build``); ``loader`` assembles one rank's
denoiser with or without engines. Imports ``core`` only."""
