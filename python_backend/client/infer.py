"""One image from the served ``pipeline`` over HTTP or gRPC: the only place that calls tritonclient."""

from __future__ import annotations

import numpy as np

from .request import DEFAULT_TIMEOUT_S, MODEL, OUTPUT, check_image, request_tensors

PROTOCOLS = ("http", "grpc")


def generate(url: str, prompt: str, protocol: str = "http", negative_prompt=None, seed=None, steps=None,
             guidance_scale=None, scheduler=None, height=None, width=None, model: str = MODEL,
             timeout: float | None = None) -> np.ndarray:
    """The image as uint8 [H, W, 3]; options left None take the server's defaults.

    Server-side errors raise ``tritonclient.utils.InferenceServerException`` with the server's message.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "http":
        import tritonclient.http as triton
    else:
        import tritonclient.grpc as triton
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    inputs = []
    for name, array, triton_dtype in request_tensors(prompt, negative_prompt, seed, steps, guidance_scale,
                                                     scheduler, height, width):
        tensor = triton.InferInput(name, list(array.shape), triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput(OUTPUT)]
    if protocol == "http":
        client = triton.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        call = lambda: client.infer(model, inputs, outputs=outputs)  # noqa: E731
    else:
        client = triton.InferenceServerClient(url)
        call = lambda: client.infer(model, inputs, outputs=outputs, client_timeout=timeout)  # noqa: E731
    try:
        result = call()
    finally:
        client.close()
    return check_image(result.as_numpy(OUTPUT))
