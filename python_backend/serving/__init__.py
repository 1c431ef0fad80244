"""Serving with Triton: the Python-backend models (``*_model.py``, the only modules that import
``triton_python_backend_utils``), their input checks and settings (plain Python, tested alone), the
rank service behind the denoiser, repository filling, the ``tritonserver`` launcher, perf_analyzer
tools and the ``client``/``perf`` commands. May import ``core``, ``engines`` and ``client``."""
