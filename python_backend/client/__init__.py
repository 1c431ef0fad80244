"""Client side of the served pipeline: request tensors, one ``generate`` over HTTP or gRPC,
``generate_stream`` (gRPC, every step as it happens), perf inputs.

Light on purpose (numpy and tritonclient, no torch): an application can import it on its own.
"""

from .infer import PROTOCOLS, generate
from .request import INPUTS, MODEL, OUTPUT, request_tensors
from .stream import StepMessage, StreamCancelled, generate_stream

__all__ = ["INPUTS", "MODEL", "OUTPUT", "PROTOCOLS", "StepMessage", "StreamCancelled", "generate", "generate_stream",
           "request_tensors"]
