"""transformers ``T5EncoderModel`` safetensors -> :class:`rfmpc.models.t5.T5EncoderModel`.

Names (rfmpc nnx -> transformers), ``i`` the block index:

- ``shared`` -> ``shared`` (tied with ``encoder.embed_tokens``, see below)
- ``encoder.relative_attention_bias`` ->
  ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias`` (shared by all blocks)
- ``encoder.block.i.attn_norm`` -> ``encoder.block.i.layer.0.layer_norm``
- ``encoder.block.i.attn.{q,k,v,o}`` -> ``encoder.block.i.layer.0.SelfAttention.{q,k,v,o}``
- ``encoder.block.i.ff_norm`` -> ``encoder.block.i.layer.1.layer_norm``
- ``encoder.block.i.ff.{wi_0,wi_1,wo}`` -> ``encoder.block.i.layer.1.DenseReluDense.{...}``
- ``encoder.final_layer_norm`` -> ``encoder.final_layer_norm``

The token embedding is tied: transformers 5 saves only ``shared.weight``; older versions and
other writers may save ``encoder.embed_tokens.weight`` too, or only it. Whichever is present
is used; when both are, they must be identical (else the checkpoint is ambiguous and loading
raises). No torch needed.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from rfmpc.models.t5 import T5Config, T5EncoderModel
from weights_conversion.safetensors_io import (
    TensorSource,
    WeightLoadError,
    load_into_model,
    open_folder,
)
from weights_conversion.torch_layout import (
    abstract_model,
    convert_by_path,
    read_config,
    torch_key,
)

__all__ = ["convert_t5_params", "load_t5_encoder"]

_RENAMES = (
    (
        r"^encoder\.relative_attention_bias$",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
    ),
    (r"\.attn_norm$", ".layer.0.layer_norm"),
    (r"\.attn\.", ".layer.0.SelfAttention."),
    (r"\.ff_norm$", ".layer.1.layer_norm"),
    (r"\.ff\.", ".layer.1.DenseReluDense."),
)
_SHARED, _TIED = "shared.weight", "encoder.embed_tokens.weight"


def _tied_embedding(source: TensorSource, shape: tuple[int, ...]) -> np.ndarray:
    present = [k for k in (_SHARED, _TIED) if k in source]
    if not present:
        raise WeightLoadError(
            f"missing key {_SHARED!r} (or its tied copy {_TIED!r}) in {source.description}: "
            "the checkpoint has no token embedding"
        )
    arrays = [source.take(k, shape) for k in present]
    if len(arrays) == 2 and not np.array_equal(arrays[0], arrays[1]):
        raise WeightLoadError(
            f"{_SHARED!r} and {_TIED!r} in {source.description} differ: the tied token "
            "embedding is ambiguous; re-save the checkpoint with transformers"
        )
    return arrays[0]


def convert_t5_params(model: T5EncoderModel, source: TensorSource) -> dict:
    """Map every parameter of ``model`` to its transformers tensor, in rfmpc layout."""
    return convert_by_path(
        model,
        source,
        lambda p: torch_key(p, _RENAMES),
        special={"shared.embedding": lambda shape: _tied_embedding(source, shape)},
    )


def load_t5_encoder(folder: str | os.PathLike, dtype=jnp.float32) -> T5EncoderModel:
    """Load a transformers ``T5EncoderModel`` folder (``config.json`` + ``model.safetensors``
    or a sharded index) strictly: any missing, unmapped or mis-shaped key raises
    :class:`WeightLoadError`. Parameters and compute use ``dtype`` (bfloat16 or float32;
    T5 v1.1 overflows float16)."""
    config = T5Config.from_hf(read_config(folder))
    model = abstract_model(
        lambda rngs: T5EncoderModel(config, dtype=dtype, param_dtype=dtype, rngs=rngs)
    )
    source = open_folder(folder, "model")
    params = convert_t5_params(model, source)
    source.assert_all_consumed()
    return load_into_model(model, params, source=source.description, dtype=dtype)
