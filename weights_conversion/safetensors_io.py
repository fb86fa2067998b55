"""Backwards-compatible name of :mod:`rfmpc.weights_io` (the torch-free safetensors reader).

The reader moved into the package so that :mod:`rfmpc.models` can load rfmpc-format folders
without importing ``weights_conversion``; the key maps here keep importing it under this name.
"""

from rfmpc.weights_io import *  # noqa: F403  (re-exports every name of rfmpc.weights_io.__all__)
from rfmpc.weights_io import __all__  # noqa: F401
