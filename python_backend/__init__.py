"""DistriFusion (displaced patch parallelism) for diffusers UNets, served by Triton.

Modules, from the math outwards: ``layout`` (who owns which rows), ``patch_math`` (what a
patch-aware layer computes), ``exchange`` (how buffers travel), ``context`` (which buffers a layer
uses in which mode and step), ``patch_layers`` (the layers swapped into a diffusers UNet),
``denoise`` (the loop), ``ranks`` (the process group), ``cli``.
"""

__version__ = "0.1.0"
