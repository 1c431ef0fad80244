"""Triton entry point of the ``postprocess`` model; the code lives in python_backend.serving."""

from python_backend.serving.postprocess_model import TritonPythonModel  # noqa: F401
