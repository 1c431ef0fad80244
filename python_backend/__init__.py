"""DistriFusion (displaced patch parallelism) for diffusers UNets, served by Triton.

Subpackages by role, each importing only the ones below it (docs/architecture.md, tests/test_architecture.py):

- ``core``: the algorithm. Row-slab layout, patch math, the buffer transport and its exchange,
  modes, patch-aware layers, the denoising loop and the rank group. Imports no other subpackage.
- ``engines``: the UNet cut into segments, exported to ONNX and compiled (TensorRT), their runners,
  the build cache, and the assembly of one rank's denoiser. Imports ``core``.
- ``embedded``: the project's own default model. Imports ``core``.
- ``client``: request tensors and one ``generate`` over HTTP/gRPC; no torch. Imports ``core.defaults``.
- ``serving``: the Triton models, the rank service, repository filling, the server launcher, perf
  tools and the client commands. Imports the above.
- ``cli``: the ``distrifusion`` command line on top.
"""

__version__ = "0.1.0"
