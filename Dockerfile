# DistriFusion on Triton for GPU hosts: the NGC Triton image with this project installed into its Python,
# the one the image's Python backend stub embeds. 25.10 is on CUDA 13.0 and Python 3.12: the CUDA of torch
# 2.13's default wheel and of tensorrt-cu13 (one CUDA major for all three; docs/gpu.md). Needs NVIDIA driver
# >= 580 on the host. The server speaks the same v2 HTTP/gRPC protocol as the pinned tritonclient 2.51.
FROM nvcr.io/nvidia/tritonserver:25.10-py3

# curl for the compose healthcheck
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/distrifusion
# Dependency layer first, from pyproject.toml alone, so an edit to the source does not reinstall torch: the
# pinned [project].dependencies plus the gpu extra (TensorRT Python bindings and Polygraphy for engine
# builds; the image's own TensorRT libraries serve only Triton's TensorRT backend). Never the server extra
# (nvidia-pytriton): the image has its own tritonserver and Python backend. The image's Python is the
# system one (PEP 668), hence --break-system-packages.
COPY pyproject.toml ./
RUN python3 -c 'import subprocess, sys, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
deps = project["dependencies"] + project["optional-dependencies"]["gpu"]; \
subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-cache-dir", "--break-system-packages", *deps])'

# Then the project itself, non-editable: the package and its data (model-repository templates, perf
# inputs) go into site-packages. The source tree stays here for the build recipes in build/ and the
# engine cache in build/out/engines (see docker-compose.yml).
COPY . .
RUN python3 -m pip install --no-cache-dir --break-system-packages --no-deps . \
    && rm -rf build/lib build/bdist.* *.egg-info

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

EXPOSE 8000 8001 8002
# Inside the container the server listens on every interface (the published ports need it); who
# can reach them is decided where the ports are published (docs/security.md).
CMD ["distrifusion", "serve", "--repository", "/repository", "--host", "0.0.0.0", "--ready-timeout", "900"]
