"""Triton entry point of the ``text_encoder`` model; the code lives in python_backend.serving."""

from python_backend.serving.text_encoder_model import TritonPythonModel  # noqa: F401
