"""Weight conversion: read diffusers / transformers safetensors folders without torch and map
every key onto rfmpc's Flax (nnx) models. Conversion code owns every layout transpose."""

from weights_conversion.safetensors_io import (
    SafetensorsFile,
    TensorSource,
    WeightLoadError,
    find_weight_files,
    load_into_model,
    open_folder,
)

__all__ = [
    "SafetensorsFile",
    "TensorSource",
    "WeightLoadError",
    "find_weight_files",
    "load_into_model",
    "open_folder",
]
