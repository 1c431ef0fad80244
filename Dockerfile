# DistriFusion on Triton for GPU hosts: the NGC Triton image (Triton 2.51, like the pinned tritonclient)
# with this project installed into its Python, the one Triton's Python backend stub runs.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# curl for the compose healthcheck
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distrifusion
COPY . .
# Pinned dependencies from pyproject.toml plus the gpu extra (TensorRT Python bindings and Polygraphy for
# engine builds; the image's own TensorRT libraries serve only Triton's TensorRT backend). Editable, so
# the source tree (model_repository/ templates, clients/) stays where the package looks for it.
RUN python3 -m pip install --no-cache-dir -e ".[gpu]"

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

EXPOSE 8000 8001 8002
CMD ["distrifusion", "serve", "--repository", "/repository"]
