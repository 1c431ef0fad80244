"""Triton entry point of the ``denoiser`` model; the code lives in python_backend.serving."""

from python_backend.serving.denoiser_model import TritonPythonModel  # noqa: F401
