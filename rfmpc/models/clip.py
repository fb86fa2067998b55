"""CLIP's text tower with projection (transformers ``CLIPTextModelWithProjection``), Flax nnx.

Pre-LayerNorm transformer with learned absolute positions and a causal mask, a final
LayerNorm, the end-of-text token's state as the pooled output, and a bias-free projection.
SD3 uses two of them: CLIP ViT-L/14 (``hidden_act="quick_gelu"``) and OpenCLIP ViT-bigG/14
(``hidden_act="gelu"``), taking the penultimate hidden state (before the final LayerNorm) as
the per-token conditioning and the projected pooled output as the global one.

Pooling follows transformers 5 exactly: when ``eos_token_id == 2`` (legacy configs, written
before transformers PR #24773) the pooled token is the position of the *largest* token id
(``argmax(input_ids)``, which is the end-of-text token in the original vocabulary); otherwise
it is the *first* position holding ``eos_token_id``.

Module attribute names follow transformers so the key map is the identity up to leaf names.
Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision" (arXiv:2103.00020).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

__all__ = ["CLIPTextConfig", "CLIPTextModelWithProjection", "CLIPTextOutput"]

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Static configuration; defaults are transformers' ``CLIPTextConfig`` defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(
                f"CLIPTextConfig.eos_token_id must be one int (transformers pools on a single "
                f"end-of-text id), got {self.eos_token_id!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """Build from a transformers ``config.json`` dict (a ``CLIPTextConfig``, or a full
        ``CLIPConfig`` whose ``text_config`` is used); absent keys take transformers' defaults."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict from config.json, got {type(config).__name__}")
        if config.get("model_type") == "clip" and "text_config" in config:
            config = config["text_config"]
        mt = config.get("model_type", "clip_text_model")
        if mt != "clip_text_model":
            raise ValueError(f"config has model_type={mt!r}, expected 'clip_text_model'")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields and v is not None}
        return cls(**kwargs)


class CLIPTextOutput(NamedTuple):
    """What SD3 needs from a CLIP text encoder.

    - ``last_hidden_state``: (b, t, d) after the final LayerNorm.
    - ``hidden_states``: ``num_hidden_layers + 1`` arrays (b, t, d): the embeddings, then each
      layer's output *before* the final LayerNorm (as transformers returns them). SD3 uses
      ``hidden_states[-2]`` (see :attr:`penultimate`).
    - ``pooler_output``: (b, d), the final-LayerNormed state of the end-of-text token.
    - ``text_embeds``: (b, projection_dim), ``pooler_output @ text_projection``.
    """

    last_hidden_state: Float[Array, "b t d"]
    hidden_states: tuple[Float[Array, "b t d"], ...]
    pooler_output: Float[Array, "b d"]
    text_embeds: Float[Array, "b p"]

    @property
    def penultimate(self) -> Float[Array, "b t d"]:
        """``hidden_states[-2]``: the input of the last layer, SD3's per-token conditioning."""
        return self.hidden_states[-2]


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, input_ids):
        t = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size

        def lin():
            return nnx.Linear(d, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.q_proj, self.k_proj, self.v_proj, self.out_proj = lin(), lin(), lin(), lin()

    def __call__(self, x, mask):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        # scale 1/sqrt(head_dim), float32 logits; mask (b or 1, 1, t, t) is causal & padding
        out = jax.nn.dot_product_attention(q, k, v, mask=mask)
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(cfg, dtype, param_dtype, rngs):
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = _layer_norm(cfg, **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = _layer_norm(cfg, **kw)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, **kw)
        self.final_layer_norm = _layer_norm(cfg, **kw)


def _pooled_positions(input_ids, eos_token_id: int):
    if eos_token_id == 2:
        # Legacy configs: the end-of-text token has the largest id of the original vocabulary.
        return jnp.argmax(input_ids, axis=-1)
    # First occurrence (the pad token may equal the end-of-text token).
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModelWithProjection(nnx.Module):
    """transformers' ``CLIPTextModelWithProjection`` in nnx; call it on token ids (b, t)."""

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(config, CLIPTextConfig):
            raise TypeError(
                f"config must be a CLIPTextConfig (use CLIPTextConfig.from_hf), got {type(config)}"
            )
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.text_model = CLIPTextTransformer(config, **kw)
        self.text_projection = nnx.Linear(
            config.hidden_size, config.projection_dim, use_bias=False, **kw
        )

    def __call__(
        self,
        input_ids: Int[Array, "b t"],
        attention_mask: Int[Array, "b t"] | None = None,
    ) -> CLIPTextOutput:
        """Encode token ids (each row must contain its end-of-text token).

        ``attention_mask`` (1 = token, 0 = padding) additionally hides padded *keys*, as
        transformers does when given one; SD3 passes none (padding tokens are attended to,
        causally).
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, tokens), got {input_ids.shape}")
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(
                f"input_ids has {t} tokens but max_position_embeddings is "
                f"{cfg.max_position_embeddings}; truncate with the tokenizer (max_length=77)"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (b, t):
                raise ValueError(
                    f"attention_mask must have shape {(b, t)} like input_ids, got "
                    f"{attention_mask.shape}"
                )
            mask = mask & (attention_mask != 0)[:, None, None, :]

        tm = self.text_model
        h = tm.embeddings(input_ids)
        hidden_states = [h]
        for layer in tm.encoder.layers:
            h = layer(h, mask)
            hidden_states.append(h)
        last = tm.final_layer_norm(h)
        idx = _pooled_positions(input_ids, cfg.eos_token_id)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(
            last_hidden_state=last,
            hidden_states=tuple(hidden_states),
            pooler_output=pooled,
            text_embeds=self.text_projection(pooled),
        )
