"""Generate one image with the served ``pipeline`` model over gRPC (port 8001).

    python clients/grpc_client.py --url localhost:8001 --prompt "a red circle" --seed 1 --out image.png

or from Python (the client library is part of the installed package; it needs numpy and tritonclient):

    from python_backend.client import generate
    image = generate("localhost:8001", "a red circle", protocol="grpc", seed=1, steps=20)  # uint8 [H, W, 3]

Server-side errors (a bad scheduler, a size the server was not built for) raise
``tritonclient.utils.InferenceServerException`` carrying the server's message.
"""

import sys

from python_backend.client.request import command_line

if __name__ == "__main__":
    sys.exit(command_line("grpc", "localhost:8001"))
