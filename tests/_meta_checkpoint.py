"""A stand-in checkpoint listing a torch model built on the ``meta`` device: real-size key maps
can be checked without allocating a single weight."""

from __future__ import annotations

import numpy as np

from weights_conversion.safetensors_io import TensorSource


class MetaFile:
    """Duck-types :class:`SafetensorsFile`: keys and shapes of a state dict, zero-cost arrays."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes, self.path = shapes, "meta-checkpoint"

    def keys(self):
        return list(self.shapes)

    def get(self, key):
        return np.broadcast_to(np.float32(0), self.shapes[key])


def meta_source(module, drop=()) -> TensorSource:
    """A :class:`TensorSource` over ``module.state_dict()`` shapes, minus the keys in ``drop``."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items() if k not in drop}
    return TensorSource([MetaFile(shapes)])
