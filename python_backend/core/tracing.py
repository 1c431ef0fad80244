"""Whether a forward is being turned into a graph, which changes what a layer may cache or reuse."""

from __future__ import annotations

import torch


def building_a_graph() -> bool:
    """Whether this forward is being traced or exported (TorchScript, ONNX, torch.export or compile):
    then values are symbolic, nothing may be cached from them and no data pointer can be read."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())
