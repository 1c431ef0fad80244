"""The ``distrifusion`` command line: the top layer, free to use core, engines and serving."""

from .commands import main

__all__ = ["main"]
