"""Generate one image with the served ``pipeline`` model over gRPC (port 8001).

    python clients/grpc_client.py --url localhost:8001 --prompt "a lighthouse at dusk" --seed 1 --out image.png

or from Python:

    from clients.grpc_client import generate
    image = generate("localhost:8001", "a lighthouse at dusk", seed=1, steps=20)  # uint8 [H, W, 3]

Server-side errors (a bad scheduler, a size the server was not built for) raise
``tritonclient.utils.InferenceServerException`` carrying the server's message.
"""

import sys

import tritonclient.grpc as grpcclient

try:
    from clients.request import DEFAULT_TIMEOUT_S, MODEL, OUTPUT, check_image, command_line, request_tensors
except ImportError:  # run as a script: python clients/grpc_client.py
    from request import DEFAULT_TIMEOUT_S, MODEL, OUTPUT, check_image, command_line, request_tensors


def generate(url, prompt, negative_prompt=None, seed=None, steps=None, guidance_scale=None, scheduler=None,
             height=None, width=None, model=MODEL, timeout=None):
    """Returns the image as a numpy uint8 array [H, W, 3]; options left None take the server's defaults."""
    inputs = []
    for name, array, triton_dtype in request_tensors(prompt, negative_prompt, seed, steps, guidance_scale,
                                                     scheduler, height, width):
        tensor = grpcclient.InferInput(name, list(array.shape), triton_dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(OUTPUT)],
                              client_timeout=timeout)
    finally:
        client.close()
    return check_image(result.as_numpy(OUTPUT))


def main(argv=None) -> int:
    return command_line(generate, "gRPC", "localhost:8001", argv)


if __name__ == "__main__":
    sys.exit(main())
