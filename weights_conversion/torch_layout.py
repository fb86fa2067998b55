"""Path-driven key maps from PyTorch checkpoints onto nnx models, owning every transpose.

A converter walks the *model's* parameters (so nothing the model needs can be forgotten),
turns each nnx path into the PyTorch key with a few regex renames plus the leaf rule below,
fetches the tensor with the exact PyTorch shape it must have (:meth:`TensorSource.take`
raises naming the key, both shapes and the file) and converts the layout:

=============  ========================  ======================================
nnx leaf       PyTorch leaf              layout
=============  ========================  ======================================
``kernel`` 2D  ``weight`` (out, in)      transposed to (in, out)
``kernel`` 4D  ``weight`` OIHW           transposed to HWIO
``scale``      ``weight``                as is (LayerNorm / GroupNorm / RMSNorm)
``embedding``  ``weight`` (num, dim)     as is
``bias``       ``bias``                  as is
=============  ========================  ======================================

Afterwards the caller runs :meth:`TensorSource.assert_all_consumed`, so a checkpoint with
tensors the model does not use fails too; keys ignored on purpose are named explicitly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from rfmpc.weights_io import TensorSource, WeightLoadError, _path_str

__all__ = ["abstract_model", "convert_by_path", "model_param_shapes", "read_config", "torch_key"]

_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


class _ConstantRngs:
    """Stands in for ``nnx.Rngs`` while building an *abstract* model: every stream returns the
    same key, with no counter. Parameter values are never materialised, so the key does not
    matter; what matters is speed. With flax 0.12 / jax 0.10, each ``nnx.Rngs`` draw under
    ``nnx.eval_shape`` assigns a tracer to the stream's counter, and flax's check of the
    tracer's ``sharding`` makes jax build an error message by scanning the whole trace so far:
    quadratic in the number of parameters (14 s instead of 2 s for CLIP-bigG's text tower)."""

    def __init__(self):
        import jax

        self._key = jax.random.key(0)

    def __call__(self):
        return self._key

    def __getattr__(self, stream: str):
        if stream.startswith("_"):
            raise AttributeError(stream)
        return self


def abstract_model(build: Callable):
    """``build(rngs)`` under ``nnx.eval_shape``: the model's structure with
    ``ShapeDtypeStruct`` parameters, allocating nothing (fast, see :class:`_ConstantRngs`)."""
    from flax import nnx

    return nnx.eval_shape(lambda: build(_ConstantRngs()))


def model_param_shapes(model) -> dict[str, tuple[int, ...]]:
    """Dotted nnx path -> shape of every ``nnx.Param`` of ``model`` (abstract models work)."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {_path_str(k): tuple(v.get_value().shape) for k, v in flat}


def torch_key(path: str, renames: Iterable[tuple[str, str]] = ()) -> str:
    """The PyTorch key of nnx ``path``: regex ``renames`` applied in order, then the leaf rule."""
    head, _, leaf = path.rpartition(".")
    if leaf not in _LEAF:
        raise WeightLoadError(f"no PyTorch leaf rule for nnx parameter {path!r}")
    for pattern, repl in renames:
        head = re.sub(pattern, repl, head)
    return f"{head}.{_LEAF[leaf]}" if head else _LEAF[leaf]


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    if leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return shape


def _to_rfmpc(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and arr.ndim == 2:
        return arr.T
    if leaf == "kernel" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    return arr


def convert_by_path(
    model,
    source: TensorSource,
    key_of: Callable[[str], str],
    *,
    special: dict[str, Callable[[tuple[int, ...]], np.ndarray]] | None = None,
) -> dict[str, np.ndarray]:
    """Fetch and re-layout one tensor per parameter of ``model`` (see the module docstring).

    ``key_of`` maps a dotted nnx path to its PyTorch key; ``special`` maps an nnx path to a
    function of the expected (rfmpc-layout) shape returning the array, for the rare
    parameters that are not a one-to-one key (tied embeddings). Returns arrays in rfmpc layout,
    still lazily memory-mapped where no transpose was needed.
    """
    special = special or {}
    params: dict[str, np.ndarray] = {}
    for path, shape in model_param_shapes(model).items():
        if path in special:
            params[path] = special[path](shape)
            continue
        leaf = path.rpartition(".")[2]
        arr = source.take(key_of(path), _torch_shape(leaf, shape))
        params[path] = _to_rfmpc(leaf, arr)
    return params


def read_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a model folder as a dict (raises :class:`WeightLoadError`)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightLoadError(f"{path}: no config.json; pass the model's folder (e.g. <pipe>/vae)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path}: invalid JSON ({e})") from e
