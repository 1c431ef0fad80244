# DistriFusion on Triton for GPU hosts: the NGC Triton image with this project installed into its Python,
# the one the image's Python backend stub embeds. 24.12 (Triton 2.53) is the first release on Python 3.12;
# 24.10/24.11 (Triton 2.51/2.52) have Python 3.10, which the pinned transformers/diffusers do not support.
# Triton 2.53 speaks the same v2 HTTP/gRPC protocol as the pinned tritonclient 2.51.
FROM nvcr.io/nvidia/tritonserver:24.12-py3

# curl for the compose healthcheck
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distrifusion
COPY . .
# Pinned dependencies from pyproject.toml plus the gpu extra (TensorRT Python bindings and Polygraphy for
# engine builds; the image's own TensorRT libraries serve only Triton's TensorRT backend). Editable, so
# the source tree (model_repository/ templates, clients/) stays where the package looks for it. The image's
# Python is the system one (PEP 668), hence --break-system-packages.
RUN python3 -m pip install --no-cache-dir --break-system-packages -e ".[gpu]"

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

EXPOSE 8000 8001 8002
CMD ["distrifusion", "serve", "--repository", "/repository", "--ready-timeout", "900"]
