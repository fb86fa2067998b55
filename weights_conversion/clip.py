"""transformers ``CLIPTextModelWithProjection`` safetensors ->
:class:`rfmpc.models.clip.CLIPTextModelWithProjection`.

Module names are transformers' own, so each key is the nnx path with the leaf renamed
(``kernel``/``scale``/``embedding`` -> ``weight``) and linear kernels transposed (see
:mod:`weights_conversion.torch_layout`). No torch needed.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from rfmpc.models.clip import CLIPTextConfig, CLIPTextModelWithProjection
from weights_conversion.safetensors_io import TensorSource, load_into_model, open_folder
from weights_conversion.torch_layout import (
    abstract_model,
    convert_by_path,
    read_config,
    torch_key,
)

__all__ = ["convert_clip_params", "ignored_clip_key", "load_clip_text"]


def ignored_clip_key(key: str) -> bool:
    """Keys present in some CLIP checkpoints that carry no parameters, ignored on purpose.

    ``text_model.embeddings.position_ids`` is the ``arange(max_position_embeddings)`` buffer
    that older transformers versions saved (persistent buffer); positions are recomputed.
    """
    return key == "text_model.embeddings.position_ids"


def convert_clip_params(model: CLIPTextModelWithProjection, source: TensorSource) -> dict:
    """Map every parameter of ``model`` to its transformers tensor, in rfmpc layout."""
    return convert_by_path(model, source, torch_key)


def load_clip_text(folder: str | os.PathLike, dtype=jnp.float32) -> CLIPTextModelWithProjection:
    """Load a transformers ``CLIPTextModelWithProjection`` folder (``config.json`` +
    ``model.safetensors`` or a sharded index) strictly: any missing, unmapped or mis-shaped key
    raises :class:`WeightLoadError`. Parameters and compute use ``dtype``."""
    config = CLIPTextConfig.from_hf(read_config(folder))
    model = abstract_model(
        lambda rngs: CLIPTextModelWithProjection(config, dtype=dtype, param_dtype=dtype, rngs=rngs)
    )
    source = open_folder(folder, "model")
    params = convert_clip_params(model, source)
    source.assert_all_consumed(ignore=ignored_clip_key)
    return load_into_model(model, params, source=source.description, dtype=dtype)
