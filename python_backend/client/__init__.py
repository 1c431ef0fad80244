"""Client side of the served pipeline: request tensors, one ``generate`` over HTTP or gRPC, perf inputs.

Light on purpose (numpy and tritonclient, no torch): an application can import it on its own.
"""

from .infer import PROTOCOLS, generate
from .request import INPUTS, MODEL, OUTPUT, request_tensors

__all__ = ["INPUTS", "MODEL", "OUTPUT", "PROTOCOLS", "generate", "request_tensors"]
