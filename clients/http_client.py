"""Generate one image with the served ``pipeline`` model over HTTP/REST (port 8000).

    python clients/http_client.py --url localhost:8000 --prompt "a lighthouse at dusk" --seed 1 --out image.png

or from Python:

    from clients.http_client import generate
    image = generate("localhost:8000", "a lighthouse at dusk", seed=1, steps=20)  # uint8 [H, W, 3]

Server-side errors (a bad scheduler, a size the server was not built for) raise
``tritonclient.utils.InferenceServerException`` carrying the server's message.
"""

import sys

import tritonclient.http as httpclient

try:
    from clients.request import DEFAULT_TIMEOUT_S, MODEL, OUTPUT, check_image, command_line, request_tensors
except ImportError:  # run as a script: python clients/http_client.py
    from request import DEFAULT_TIMEOUT_S, MODEL, OUTPUT, check_image, command_line, request_tensors


def generate(url, prompt, negative_prompt=None, seed=None, steps=None, guidance_scale=None, scheduler=None,
             height=None, width=None, model=MODEL, timeout=None):
    """Returns the image as a numpy uint8 array [H, W, 3]; options left None take the server's defaults."""
    inputs = []
    for name, array, triton_dtype in request_tensors(prompt, negative_prompt, seed, steps, guidance_scale,
                                                     scheduler, height, width):
        tensor = httpclient.InferInput(name, list(array.shape), triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    try:
        result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(OUTPUT)])
    finally:
        client.close()
    return check_image(result.as_numpy(OUTPUT))


def main(argv=None) -> int:
    return command_line(generate, "HTTP", "localhost:8000", argv)


if __name__ == "__main__":
    sys.exit(main())
