"""Reading and writing the embedded model's text encoder folder (the shipped asset).

A folder holds ``config.json`` (``{"format": "rfmpc-text-encoder", "format_version": 1,
"config": ..., "training": ...}``), ``model.safetensors`` (the :class:`TextEncoder`'s parameters
under their dotted nnx paths) and ``tokenizer.json`` (the grammar's :class:`PromptTokenizer`).
:func:`load_text_encoder` loads the shipped asset (``rfmpc/assets/text_encoder/``) or any folder
:func:`save_text_encoder` wrote. It lives here, beside the tokenizer and the trainer
(:mod:`rfmpc.data.train_text`), so that :mod:`rfmpc.models.text_encoder` stays a network that
imports neither the data package nor the tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rfmpc.data.tokenizer import PromptTokenizer
from rfmpc.io import SafetensorsReadError, atomic_write_bytes, load_safetensors, save_safetensors
from rfmpc.models.text_encoder import PromptEncoder, TextEncoder, TextEncoderConfig

__all__ = ["DEFAULT_TEXT_ENCODER_DIR", "load_text_encoder", "save_text_encoder"]

#: Where the embedded default text encoder lives.
DEFAULT_TEXT_ENCODER_DIR = Path(__file__).resolve().parent.parent / "assets" / "text_encoder"
_FORMAT = "rfmpc-text-encoder"
_FORMAT_VERSION = 1


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    out = {}
    for path, leaf in leaves:
        name = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        out[name] = np.asarray(leaf, dtype=np.float32)
    return out


def save_text_encoder(
    folder: str | os.PathLike,
    model: TextEncoder,
    tokenizer: PromptTokenizer,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` to ``folder``.

    Each file is written atomically (:mod:`rfmpc.io`: temp file, fsync, rename); the weights are
    standard safetensors (float32, ``{"format": "np"}`` metadata), so folders written before
    through ``safetensors.numpy`` and folders written now read alike. ``metadata`` (JSON-able) is
    stored in ``config.json`` under ``"training"``.
    """
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={model.config.vocab_size} != tokenizer vocab size "
            f"{tokenizer.vocab_size}"
        )
    folder = Path(folder)
    tensors = _flat_params(model)
    config = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "config": model.config.to_dict(),
        "training": dict(metadata or {}),
    }
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    save_safetensors(folder / "model.safetensors", tensors, {"format": "np"})
    tokenizer.save(folder / "tokenizer.json")


def _load_model(folder: Path, config: TextEncoderConfig) -> TextEncoder:
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    try:
        tensors, _ = load_safetensors(path)
    except SafetensorsReadError as e:
        raise ValueError(f"not a readable safetensors file: {e}") from e
    abstract = nnx.eval_shape(lambda: TextEncoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in pt) for pt, _ in leaves]
    missing = sorted(set(names) - set(tensors))
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(
            f"{path} does not match the config in config.json: missing {missing[:8]}, "
            f"unexpected {extra[:8]}"
        )
    values = []
    for name, (_, leaf) in zip(names, leaves):
        arr = tensors[name]
        if tuple(arr.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {arr.shape}, the config expects {leaf.shape}"
            )
        values.append(jnp.asarray(arr, dtype=leaf.dtype))
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, values))
    return nnx.merge(graphdef, state)


def load_text_encoder(folder: str | os.PathLike | None = None) -> PromptEncoder:
    """Load a text encoder folder (None: the embedded default in ``rfmpc/assets/text_encoder``).

    Raises:
        FileNotFoundError: a file is missing (for the default: the asset was not trained yet;
            run ``python -m rfmpc.data.train_text``).
        ValueError: the files do not match each other (config vs weights vs tokenizer).
    """
    folder = DEFAULT_TEXT_ENCODER_DIR if folder is None else Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        hint = (
            " (train it with `python -m rfmpc.data.train_text`)"
            if folder == (DEFAULT_TEXT_ENCODER_DIR)
            else ""
        )
        raise FileNotFoundError(f"no config.json in {folder}{hint}")
    raw = json.loads(cfg_path.read_text())
    if raw.get("format") != _FORMAT:
        raise ValueError(
            f"{cfg_path} is not an rfmpc text encoder config (format={raw.get('format')!r})"
        )
    config = TextEncoderConfig.from_dict(raw["config"])
    tokenizer = PromptTokenizer.load(folder / "tokenizer.json")
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens, config.json says "
            f"vocab_size={config.vocab_size}"
        )
    return PromptEncoder(_load_model(folder, config), tokenizer, raw.get("training"))
