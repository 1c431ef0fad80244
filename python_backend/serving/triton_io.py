"""Reading inputs from and answering Triton Python-backend requests."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from .validation import InputError


def optional_value(request, name: str):
    """The single element of input ``name``, or None when the request did not send it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise InputError(f"input '{name}' must hold exactly one element, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value if isinstance(value, (bytes, str)) else value.item()


def tensor(request, name: str) -> np.ndarray | None:
    """Input ``name`` as an array, or None when the request did not send it."""
    given = pb_utils.get_input_tensor_by_name(request, name)
    return None if given is None else given.as_numpy()


def respond(outputs: dict[str, np.ndarray]):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])


class Stopped(Exception):
    """The request was stopped (cancelled or timed out) at a step boundary."""


def error(message: str, code=None):
    code = pb_utils.TritonError.INTERNAL if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


FINALIZED = "{model}: finalize done"
"""What each model logs (Triton's log, info level) at the end of its ``finalize``: a clean unload."""


def log_finalized(model: str) -> None:
    pb_utils.Logger.log_info(FINALIZED.format(model=model))


def check_request_id(request_id: str, max_chars: int) -> None:
    """Request ids are echoed in responses and logs: a client must not make them arbitrarily long."""
    if len(request_id) > max_chars:
        raise InputError(f"request 'id' is {len(request_id)} characters long; allowed: at most {max_chars}")


def answer_each(requests, handle, max_id_chars: int):
    """Runs ``handle(request) -> outputs`` per request; a bad input answers that request alone."""
    responses = []
    for request in requests:
        try:
            check_request_id(request.request_id(), max_id_chars)
            responses.append(respond(handle(request)))
        except InputError as bad:
            responses.append(error(str(bad), pb_utils.TritonError.INVALID_ARG))
        except Stopped as stopped:
            responses.append(error(str(stopped), getattr(pb_utils.TritonError, "CANCELLED", None)))
        except Exception as failure:  # the model stays up; the client learns what went wrong
            pb_utils.Logger.log_error(f"request failed: {failure!r}")
            responses.append(error(f"internal error: {failure}"))
    return responses
