"""diffusers ``SD3Transformer2DModel`` safetensors -> rfmpc :class:`~rfmpc.models.mmdit.MMDiT`.

The key map is derived from the rfmpc model itself: every variable of the (abstract) model names
exactly one diffusers tensor, with the layout change it needs. This file owns every transpose:

- ``nn.Linear`` weight ``(out, in)`` -> nnx ``kernel`` ``(in, out)``;
- the patch ``nn.Conv2d`` weight ``OIHW`` -> ``HWIO``;
- the position table ``(1, m*m, d)`` -> ``(m, m, d)``.

Module names follow diffusers except ``to_out.0 -> to_out`` and the feed-forward
``net.0.proj -> fc1``, ``net.2 -> fc2``. Loading is strict: a tensor the model needs but the
checkpoint lacks, a tensor of the wrong shape, or a checkpoint tensor the model does not use
raises :class:`~weights_conversion.safetensors_io.WeightLoadError` naming the key, the shapes and
the file. No torch is needed: tensors are memory-mapped one at a time (fp32, bf16 or fp16).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weights_conversion.safetensors_io import (
    TensorSource,
    WeightLoadError,
    load_into_model,
    open_folder,
)

__all__ = [
    "DIFFUSERS_STEM",
    "convert_mmdit",
    "diffusers_key_map",
    "load_diffusers_mmdit",
    "read_diffusers_config",
]

#: File stem of diffusers model weights: ``diffusion_pytorch_model.safetensors[.index.json]``.
DIFFUSERS_STEM = "diffusion_pytorch_model"

# rfmpc module name -> diffusers module name (path components).
_RENAMES = {"to_out": "to_out.0", "fc1": "net.0.proj", "fc2": "net.2"}

Convert = Callable[[np.ndarray], np.ndarray]


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _linear_t(a: np.ndarray) -> np.ndarray:
    return a.T


def _conv_oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _diffusers_entry(path: tuple, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], Convert]:
    """(diffusers key, diffusers shape, converter to rfmpc layout) of one rfmpc variable."""
    parts = [str(p) for p in path]
    if parts == ["pos_embed", "pos_embed"]:
        m1, m2, d = shape
        return "pos_embed.pos_embed", (1, m1 * m2, d), lambda a: a.reshape(m1, m2, d)
    *mods, leaf = parts
    prefix = ".".join(_RENAMES.get(m, m) for m in mods)
    if leaf == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return f"{prefix}.weight", (o, i, h, w), _conv_oihw_to_hwio
    if leaf == "kernel" and len(shape) == 2:
        return f"{prefix}.weight", (shape[1], shape[0]), _linear_t
    if leaf in ("bias", "weight"):
        return f"{prefix}.{leaf}", tuple(shape), _identity
    raise WeightLoadError(f"rfmpc MMDiT variable {'.'.join(parts)!r} has no diffusers mapping")


def _variables(model):
    from flax import nnx

    from rfmpc.models.mmdit import Buffer

    state = nnx.state(model, (nnx.Param, Buffer))
    for path, var in nnx.to_flat_state(state):
        yield path, var.get_value()


def diffusers_key_map(model) -> dict[str, tuple[str, tuple[int, ...], Convert]]:
    """``{rfmpc dotted path: (diffusers key, diffusers shape, converter)}`` for ``model``.

    ``model`` is an :class:`~rfmpc.models.mmdit.MMDiT`, typically abstract (``nnx.eval_shape``).
    """
    out = {}
    for path, value in _variables(model):
        out[".".join(str(p) for p in path)] = _diffusers_entry(path, tuple(value.shape))
    return out


def convert_mmdit(source: TensorSource, model) -> dict[str, np.ndarray]:
    """Map every tensor of ``source`` onto ``model``'s variables (rfmpc layout, lazy views).

    Raises :class:`WeightLoadError` on any missing, mis-shaped or unused checkpoint key.
    """
    params = {}
    for name, (key, shape, convert) in diffusers_key_map(model).items():
        params[name] = convert(source.take(key, shape))
    source.assert_all_consumed()
    return params


def read_diffusers_config(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a diffusers model folder (WeightLoadError if unreadable)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightLoadError(f"{path}: missing; pass the transformer folder of a diffusers model")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(
            f"{path}: not valid JSON ({e}); restore the config.json saved with these weights"
        ) from e


def load_diffusers_mmdit(
    folder: str | os.PathLike, *, dtype=None, param_dtype=None, attention: str = "auto"
):
    """Build an :class:`~rfmpc.models.mmdit.MMDiT` from a diffusers transformer folder.

    The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded
    ``.safetensors.index.json``). The model is built abstractly (``nnx.eval_shape``, no random
    init), then filled strictly. ``dtype`` is the compute dtype (default float32),
    ``param_dtype`` the storage dtype (default: ``dtype``) and ``attention`` the attention
    implementation (see :class:`~rfmpc.models.mmdit.MMDiT`). Returns ``(model, config)``.
    """
    import jax.numpy as jnp
    from flax import nnx

    from rfmpc.models.configs import MMDiTConfig
    from rfmpc.models.mmdit import Buffer, MMDiT

    dtype = jnp.float32 if dtype is None else dtype
    param_dtype = dtype if param_dtype is None else param_dtype
    config = MMDiTConfig.from_diffusers(read_diffusers_config(folder))
    source = open_folder(folder, DIFFUSERS_STEM)
    model = nnx.eval_shape(
        lambda: MMDiT(
            config, dtype=dtype, param_dtype=param_dtype, attention=attention, rngs=nnx.Rngs(0)
        )
    )
    params = convert_mmdit(source, model)
    load_into_model(model, params, source=source.description, variables=(nnx.Param, Buffer))
    return model, config
