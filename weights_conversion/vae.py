"""diffusers ``AutoencoderKL`` safetensors -> :class:`rfmpc.models.vae.AutoencoderKL`.

Our modules keep diffusers' names except where diffusers wraps a single layer in a list:

====================================  ==========================================
rfmpc (nnx)                           diffusers
====================================  ==========================================
``*.down_blocks.i.downsampler``       ``*.down_blocks.i.downsamplers.0.conv``
``*.up_blocks.i.upsampler``           ``*.up_blocks.i.upsamplers.0.conv``
``*.mid_block.attention``             ``*.mid_block.attentions.0``
``*.attention.to_out``                ``*.attentions.0.to_out.0``
====================================  ==========================================

Leaf names and transposes follow :mod:`weights_conversion.torch_layout`. No torch needed.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from rfmpc.models.vae import AutoencoderKL, VAEConfig
from weights_conversion.safetensors_io import TensorSource, load_into_model, open_folder
from weights_conversion.torch_layout import (
    abstract_model,
    convert_by_path,
    read_config,
    torch_key,
)

__all__ = ["convert_vae_params", "load_vae"]

_RENAMES = (
    (r"\.downsampler$", ".downsamplers.0.conv"),
    (r"\.upsampler$", ".upsamplers.0.conv"),
    (r"\.attention\.to_out$", ".attentions.0.to_out.0"),
    (r"\.attention\.", ".attentions.0."),
)


def convert_vae_params(model: AutoencoderKL, source: TensorSource) -> dict:
    """Map every parameter of ``model`` to its diffusers tensor, in rfmpc layout."""
    return convert_by_path(model, source, lambda p: torch_key(p, _RENAMES))


def load_vae(folder: str | os.PathLike, dtype=jnp.float32) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``) strictly: any missing, unmapped or mis-shaped key
    raises :class:`WeightLoadError`. Parameters and compute use ``dtype``."""
    config = VAEConfig.from_diffusers(read_config(folder))
    model = abstract_model(
        lambda rngs: AutoencoderKL(config, dtype=dtype, param_dtype=dtype, rngs=rngs)
    )
    source = open_folder(folder, "diffusion_pytorch_model")
    params = convert_vae_params(model, source)
    source.assert_all_consumed()
    return load_into_model(model, params, source=source.description, dtype=dtype)
