"""One image from the served ``pipeline_stream`` model over a gRPC stream, with every step as it happens.

    from python_backend.client.stream import generate_stream
    image = generate_stream("localhost:8001", "a red circle", steps=20, preview_every=5,
                            on_step=lambda s: print(s.step, s.steps, s.seconds))

The server sends one message per denoising step (``StepMessage``: step, steps, seconds since the
request started, rank 0's exchange wait so far, and on every ``preview_every``-th step a preview at
latent resolution), then the final image, the same image the ``pipeline`` ensemble returns. Setting
``stop`` (a ``threading.Event``) cancels the request: the server stops its rank group at the next step
boundary and ``StreamCancelled`` is raised here.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .request import DEFAULT_TIMEOUT_S, check_image, request_tensors

STREAM_MODEL = "pipeline_stream"
OUTPUTS = ("event", "step", "steps", "seconds", "exchange_wait_seconds", "image")


@dataclass(frozen=True)
class StepMessage:
    step: int  # 1-based
    steps: int
    seconds: float  # since the server started the request
    exchange_wait_seconds: float  # rank 0's time blocked in patch exchanges so far
    preview: np.ndarray | None  # uint8 [h, w, 3] at latent resolution, on preview steps


class StreamCancelled(Exception):
    """The request was cancelled (``stop`` was set) before its image arrived."""


def generate_stream(url: str, prompt: str, negative_prompt=None, seed=None, steps=None, guidance_scale=None,
                    scheduler=None, height=None, width=None, preview_every: int | None = None,
                    on_step: Callable[[StepMessage], None] | None = None, stop: threading.Event | None = None,
                    model: str = STREAM_MODEL, timeout: float | None = None) -> np.ndarray:
    """The final image as uint8 [H, W, 3]; ``on_step`` sees every step message first. Server-side errors
    raise ``tritonclient.utils.InferenceServerException`` with the server's message."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    inputs = []
    tensors = request_tensors(prompt, negative_prompt, seed, steps, guidance_scale, scheduler, height, width)
    if preview_every is not None:
        tensors.append(("preview_every", np.array([preview_every], dtype=np.int64), "INT64"))
    for name, array, triton_dtype in tensors:
        tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False  # any other way out (stop, an error, Ctrl-C in on_step) cancels the server's work
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS])
        waited = 0.0
        while True:
            if stop is not None and stop.is_set():
                raise StreamCancelled("the request was cancelled before its image arrived")
            try:
                result, error = answers.get(timeout=0.1)
            except queue.Empty:
                waited += 0.1
                if waited > timeout:
                    raise TimeoutError(f"no message from the server for {timeout:g} s") from None
                continue
            waited = 0.0
            if error is not None:
                finished = True  # the server ended the request itself
                raise error if isinstance(error, InferenceServerException) else InferenceServerException(str(error))
            event = result.as_numpy("event")[0].decode()
            if event == "image":
                finished = True
                return check_image(result.as_numpy("image"))
            if on_step is not None:
                image = result.as_numpy("image")
                on_step(StepMessage(step=int(result.as_numpy("step")[0]), steps=int(result.as_numpy("steps")[0]),
                                    seconds=float(result.as_numpy("seconds")[0]),
                                    exchange_wait_seconds=float(result.as_numpy("exchange_wait_seconds")[0]),
                                    preview=image if image.size else None))
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()
