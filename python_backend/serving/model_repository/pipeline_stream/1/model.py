"""Triton entry point of the ``pipeline_stream`` model; the code lives in python_backend.serving."""

from python_backend.serving.stream_model import TritonPythonModel  # noqa: F401
