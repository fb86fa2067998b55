"""Backwards-compatible name of :mod:`rfmpc.weights_io` (the torch-free safetensors reader).

The reader moved into the package so that :mod:`rfmpc.models` can load rfmpc-format folders
without importing ``weights_conversion``; the key maps here keep importing it under this name.
"""

from rfmpc.weights_io import (
    SafetensorsFile,
    TensorSource,
    WeightLoadError,
    find_weight_files,
    load_into_model,
    open_folder,
    release_pages,
)

__all__ = [
    "SafetensorsFile",
    "TensorSource",
    "WeightLoadError",
    "find_weight_files",
    "load_into_model",
    "open_folder",
    "release_pages",
]
