"""T5 v1.1 encoder (transformers ``T5EncoderModel``) in Flax nnx.

Pre-norm transformer with T5's specifics: RMS LayerNorm without mean subtraction or bias,
computed in float32; no attention scaling (1/sqrt(d) is folded into the initialisation); one
learned relative-position bias (bidirectional log-spaced buckets) owned by the first layer and
shared by all layers; gated-GELU feed-forward (``gelu_new``, the tanh approximation); no
biases anywhere. SD3 uses T5-v1.1-XXL's encoder as its third text encoder.

Note: T5 v1.1 activations overflow float16; use float32 or bfloat16.

Reference: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer" (arXiv:1910.10683); Shazeer 2020, "GLU Variants Improve
Transformer" (arXiv:2002.05202).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

__all__ = ["T5Config", "T5EncoderModel", "relative_position_bucket"]

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Static configuration of the (gated-activation) T5 encoder; defaults: T5-v1.1-XXL."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"

    def __post_init__(self):
        if self.dense_act_fn not in _ACTIVATIONS:
            raise ValueError(
                f"T5Config.dense_act_fn={self.dense_act_fn!r} is not supported; use one of "
                f"{sorted(_ACTIVATIONS)}"
            )
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> T5Config:
        """Build from a transformers T5 ``config.json`` dict. The activation is derived from
        ``feed_forward_proj`` exactly as transformers does (``"gated-gelu"`` -> ``gelu_new``);
        only gated feed-forwards (T5 v1.1, used by SD3) are supported."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict from config.json, got {type(config).__name__}")
        mt = config.get("model_type", "t5")
        if mt != "t5":
            raise ValueError(f"config has model_type={mt!r}, expected 't5'")
        proj = config.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) != 2 or parts[0] != "gated":
            raise ValueError(
                f"feed_forward_proj={proj!r}: only gated feed-forwards ('gated-gelu', T5 v1.1 "
                "as in SD3) are supported"
            )
        act = "gelu_new" if proj == "gated-gelu" else parts[1]
        fields = {f.name for f in dataclasses.fields(cls)} - {"dense_act_fn"}
        kwargs = {k: v for k, v in config.items() if k in fields and v is not None}
        return cls(dense_act_fn=act, **kwargs)


def relative_position_bucket(
    relative_position: np.ndarray,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
    """T5's bucket of each relative position ``memory - query`` (Mesh TensorFlow's rule).

    Half the buckets for each direction when bidirectional; within one, exact buckets for
    distances below ``num_buckets // 2`` and log-spaced ones up to ``max_distance``, beyond
    which all distances share the last bucket. Static numpy (sequence lengths are static), in
    float32 like transformers so bucket boundaries agree exactly.
    """
    rp = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rp)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets += (rp > 0).astype(np.int64) * n
        rp = np.abs(rp)
    else:
        rp = -np.minimum(rp, 0)
    max_exact = n // 2
    is_small = rp < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rp.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(n - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, n - 1)
    return buckets + np.where(is_small, rp, large)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias; statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype=param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        scale = self.scale[...].astype(self.dtype)
        return y * scale.reshape((1,) * (y.ndim - 1) + scale.shape)


class T5SelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv

        def lin(i, o):
            return nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.q = lin(cfg.d_model, cfg.inner_dim)
        self.k = lin(cfg.d_model, cfg.inner_dim)
        self.v = lin(cfg.d_model, cfg.inner_dim)
        self.o = lin(cfg.inner_dim, cfg.d_model)

    def __call__(self, x, bias, mask):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.d_kv)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # no 1/sqrt(d) scaling in T5; float32 logits plus the shared relative-position bias
        # (in the compute dtype, as transformers adds it); mask hides padded keys
        out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=1.0)
        return self.o(out.reshape(b, t, -1))


class T5GatedFeedForward(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = _ACTIVATIONS[cfg.dense_act_fn]
        self.wi_0 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wi_1 = nnx.Linear(cfg.d_model, cfg.d_ff, **kw)
        self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, **kw)

    def __call__(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.attn = T5SelfAttention(cfg, rngs=rngs, **kw)
        self.ff_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.ff = T5GatedFeedForward(cfg, rngs=rngs, **kw)

    def __call__(self, x, bias, mask):
        x = x + self.attn(self.attn_norm(x), bias, mask)
        return x + self.ff(self.ff_norm(x))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, dtype, param_dtype, rngs):
        self.relative_attention_bias = nnx.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.block = nnx.List(
            [
                T5Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.final_layer_norm = T5LayerNorm(
            cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype
        )


class T5EncoderModel(nnx.Module):
    """transformers' ``T5EncoderModel`` (gated feed-forward) in nnx: ids (b, t) -> (b, t, d)."""

    def __init__(
        self,
        config: T5Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(config, T5Config):
            raise TypeError(f"config must be a T5Config (use T5Config.from_hf), got {type(config)}")
        self.config = config
        self.shared = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.encoder = T5Stack(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def position_bias(self, length: int) -> Float[Array, "1 heads t t"]:
        """The shared relative-position bias (1, heads, t, t), float32."""
        cfg = self.config
        pos = np.arange(length)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=True,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
        )
        values = self.encoder.relative_attention_bias(jnp.asarray(buckets, dtype=jnp.int32))
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def __call__(
        self,
        input_ids: Int[Array, "b t"],
        attention_mask: Int[Array, "b t"] | None = None,
    ) -> Float[Array, "b t d"]:
        """The last hidden state. ``attention_mask`` (1 = token, 0 = padding) hides padded
        keys from every query; SD3 passes none (padding tokens are attended to)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        b, t = input_ids.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (b, t):
                raise ValueError(
                    f"attention_mask must have shape {(b, t)} like input_ids, got "
                    f"{attention_mask.shape}"
                )
            mask = (attention_mask != 0)[:, None, None, :]
        bias = self.position_bias(t)
        h = self.shared(input_ids)
        for blk in self.encoder.block:
            h = blk(h, bias, mask)
        return self.encoder.final_layer_norm(h)
