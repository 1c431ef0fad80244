"""Triton Python-backend models (thin adapters over the package). Only this sub-package imports
``triton_python_backend_utils``; validation and settings are plain Python and tested alone."""
