"""rfmpc's own model format: ``config.json`` + ``model.safetensors`` of the nnx variables.

A folder holds

- ``config.json``: ``{"_rfmpc_kind": kind, "_rfmpc_format": 1, "config": {...}}`` where
  ``config`` is whatever the model's builder takes (for the MM-DiT: its diffusers config);
- ``model.safetensors``: every persistent nnx variable (parameters and buffers such as the
  position table) under its dotted nnx path (``transformer_blocks.0.attn.to_q.kernel``), in
  rfmpc layout and in the dtype it had in memory, so loading is a plain strict copy.

Both files are written atomically through :mod:`rfmpc.io` (temporary file in the same folder,
fsync, ``os.replace``), so a crash never leaves a half-written file under the final name; the
weights stream one tensor at a time (:func:`rfmpc.io.write_safetensors`, re-exported here).
Loading builds the model abstractly with ``nnx.eval_shape`` (no random init) and fills it
strictly through :func:`rfmpc.weights_io.load_into_model`. Safetensors + JSON only: nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from rfmpc.io import atomic_write_bytes, write_safetensors
from rfmpc.weights_io import WeightLoadError, load_into_model, open_folder

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "PERSISTENT",
    "WEIGHTS_NAME",
    "is_rfmpc_folder",
    "load_model",
    "read_model_config",
    "save_model",
    "write_safetensors",
]

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_STEM = "model"
WEIGHTS_NAME = f"{WEIGHTS_STEM}.safetensors"

#: The nnx variables a saved model carries: everything but RNG state, caches and intermediates.
PERSISTENT = nnx.Not(nnx.Any(nnx.RngState, nnx.Cache, nnx.Intermediate))


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def save_model(
    model: nnx.Module, folder: str | os.PathLike, config: Mapping[str, Any], *, kind: str
) -> Path:
    """Save ``model``'s persistent variables and its builder ``config`` to ``folder``.

    Args:
        model: any nnx module (e.g. :class:`~rfmpc.models.mmdit.MMDiT`).
        folder: output folder (created if needed); existing files are replaced atomically.
        config: JSON-serialisable dict the model's builder takes back in :func:`load_model`.
        kind: model family tag (``"mmdit"``), checked on load.

    Returns the folder.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string such as 'mmdit', got {kind!r}")
    try:
        config_text = json.dumps(
            {"_rfmpc_kind": kind, "_rfmpc_format": FORMAT_VERSION, "config": dict(config)},
            indent=2,
            sort_keys=True,
        )
    except TypeError as e:
        raise TypeError(f"config must be JSON-serialisable: {e}") from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = nnx.to_flat_state(nnx.state(model, PERSISTENT))
    tensors = [(_dotted(path), var.get_value()) for path, var in flat]
    write_safetensors(folder / WEIGHTS_NAME, tensors, {"format": "rfmpc", "kind": kind})
    atomic_write_bytes(folder / CONFIG_NAME, config_text.encode() + b"\n")
    return folder


def is_rfmpc_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model in rfmpc's format (a tagged ``config.json``)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        return "_rfmpc_kind" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        return False


def read_model_config(folder: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(kind, config)`` of an rfmpc-format folder; WeightLoadError if it is not one."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise WeightLoadError(f"{path}: missing; {folder} is not an rfmpc model folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightLoadError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or "_rfmpc_kind" not in data or "config" not in data:
        raise WeightLoadError(
            f"{path}: not an rfmpc config (no '_rfmpc_kind'/'config'); for diffusers folders use "
            "rfmpc.convert.load_transformer"
        )
    version = data.get("_rfmpc_format")
    if version != FORMAT_VERSION:
        raise WeightLoadError(
            f"{path}: rfmpc format version {version!r}, this rfmpc reads {FORMAT_VERSION}"
        )
    return data["_rfmpc_kind"], data["config"]


def load_model(
    folder: str | os.PathLike,
    build: Callable[[dict[str, Any]], nnx.Module],
    *,
    kind: str | None = None,
    dtype=None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Load a model saved by :func:`save_model`.

    Args:
        folder: the rfmpc-format folder.
        build: ``config -> module``; called under ``nnx.eval_shape`` (abstractly, no init).
        kind: expected kind tag (checked when given).
        dtype: cast every variable to this dtype (default: the dtypes ``build`` gives).

    Returns ``(module, config)``. Raises :class:`WeightLoadError` naming the key and file on
    any missing, extra or mis-shaped tensor, or on a kind mismatch.
    """
    saved_kind, config = read_model_config(folder)
    if kind is not None and saved_kind != kind:
        raise WeightLoadError(f"{folder} holds a {saved_kind!r} model, expected {kind!r}")
    model = nnx.eval_shape(lambda: build(config))
    source = open_folder(folder, WEIGHTS_STEM)
    flat = nnx.to_flat_state(nnx.state(model, PERSISTENT))
    params = {
        _dotted(path): source.take(_dotted(path), tuple(var.get_value().shape))
        for path, var in flat
    }
    source.assert_all_consumed()
    load_into_model(model, params, source=source.description, dtype=dtype, variables=PERSISTENT)
    return model, config
