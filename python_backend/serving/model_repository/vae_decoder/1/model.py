"""Triton entry point of the ``vae_decoder`` model; the code lives in python_backend.serving."""

from python_backend.serving.vae_decoder_model import TritonPythonModel  # noqa: F401
