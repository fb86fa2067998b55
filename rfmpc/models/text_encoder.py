"""Small transformer text encoder of the embedded default model (the SD3 encoders' interface).

SD3 conditions its MMDiT on a sequence of text-token embeddings (CLIP-L/G and T5 hidden states)
and a pooled embedding (CLIP's projected end token) [Esser et al. 2024, arXiv:2403.03206]. The
embedded model uses one small encoder with the same interface:

``TextEncoder(token_ids, mask) -> (seq_emb (b, L, width), pooled (b, pooled_dim))``

a pre-LayerNorm transformer [Vaswani et al. 2017; Xiong et al. 2020] over learned token and
position embeddings with key-padding masks; ``seq_emb`` is the final-normed hidden state of every
position (padding positions included, as in SD3's T5 stream) and ``pooled`` a linear projection of
the masked mean over real tokens. It is trained by :mod:`rfmpc.data.train_text` so that pooled
cosine similarity ranks prompts by how many scene attributes they share, and so that every token
of an object's phrase carries that object's attributes.

:class:`PromptEncoder` pairs a trained encoder with any :class:`Tokenizer` (the grammar's
:class:`rfmpc.data.tokenizer.PromptTokenizer` for the embedded model). Reading and writing an
encoder folder (config.json, model.safetensors, tokenizer.json; the shipped asset in
``rfmpc/assets/text_encoder/``) is :mod:`rfmpc.data.text_encoder_io`'s job, beside the tokenizer
and the trainer: the models never import :mod:`rfmpc.data`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "EncoderBlock",
    "PromptEncoder",
    "TextEncoder",
    "TextEncoderConfig",
    "Tokenizer",
]


def _pos_int(cls: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{cls}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Hyper-parameters of :class:`TextEncoder`.

    Attributes:
        vocab_size: number of token ids.
        max_length: longest sequence (size of the learned position table).
        width: model width = width of the sequence embeddings.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``width``).
        mlp_ratio: hidden width of the MLP as a multiple of ``width``.
        pooled_dim: width of the pooled embedding.
    """

    vocab_size: int
    max_length: int = 32
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    pooled_dim: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _pos_int("TextEncoderConfig", f.name, getattr(self, f.name))
        if self.width % self.num_heads:
            raise ValueError(
                f"TextEncoderConfig.width={self.width} must be divisible by "
                f"num_heads={self.num_heads}"
            )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextEncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TextEncoderConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block: masked multi-head self-attention, then a GELU MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.proj = nnx.Linear(width, width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, x: Float[Array, "b l d"], mask: Bool[Array, "b l"]) -> Float[Array, "b l d"]:
        b, length, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        qkv = self.qkv(self.norm1(x)).reshape(b, length, 3, h, dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, length, d)
        x = x + self.proj(out)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nnx.Module):
    """Token ids -> (sequence embeddings, pooled embedding); see the module docstring."""

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        w = config.width
        self.token_embed = nnx.Embed(config.vocab_size, w, rngs=rngs)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (config.max_length, w), jnp.float32)
        )
        self.blocks = nnx.List(
            [
                EncoderBlock(w, config.num_heads, config.mlp_ratio, rngs=rngs)
                for _ in range(config.depth)
            ]
        )
        self.final_norm = nnx.LayerNorm(w, rngs=rngs)
        self.pooled_proj = nnx.Linear(w, config.pooled_dim, rngs=rngs)

    def __call__(
        self, token_ids: Int[Array, "b l"], mask: Bool[Array, "b l"]
    ) -> tuple[Float[Array, "b l d"], Float[Array, "b p"]]:
        """Encode token ids.

        Args:
            token_ids: int (b, L) token ids, L <= ``config.max_length``.
            mask: bool (b, L), True on real tokens (at least one per row).

        Returns:
            ``(seq_emb, pooled)``: float32 (b, L, width) and (b, pooled_dim).
        """
        if token_ids.ndim != 2 or mask.shape != token_ids.shape:
            raise ValueError(
                f"token_ids and mask must both be (batch, length); got {token_ids.shape} and "
                f"{mask.shape}"
            )
        length = token_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(
                f"sequence length {length} exceeds TextEncoderConfig.max_length="
                f"{self.config.max_length}"
            )
        mask = mask.astype(bool)
        x = self.token_embed(token_ids) + self.pos_embed[...][None, :length, :]
        for block in self.blocks:
            x = block(x, mask)
        seq = self.final_norm(x)
        m = mask.astype(seq.dtype)[:, :, None]
        mean = jnp.sum(seq * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        return seq, self.pooled_proj(mean)


class Tokenizer(Protocol):
    """What :class:`PromptEncoder` needs of a tokenizer (e.g.
    :class:`rfmpc.data.tokenizer.PromptTokenizer`): fixed-length ids and masks for prompts."""

    max_length: int
    vocab_size: int

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 (b, L), mask bool (b, L))`` with ``L = max_length``."""
        ...


class PromptEncoder:
    """A trained :class:`TextEncoder` with its tokenizer: prompts -> (seq_emb, pooled).

    Attributes:
        model: the :class:`TextEncoder`.
        tokenizer: its :class:`Tokenizer` (the grammar's ``PromptTokenizer``).
        config: the model's :class:`TextEncoderConfig`.
        metadata: the training record stored with the weights (may be empty).
    """

    def __init__(
        self,
        model: TextEncoder,
        tokenizer: Tokenizer,
        metadata: Mapping[str, Any] | None = None,
    ):
        if tokenizer.max_length > model.config.max_length:
            raise ValueError(
                f"tokenizer max_length {tokenizer.max_length} exceeds the model's "
                f"{model.config.max_length}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.metadata = dict(metadata or {})
        graphdef, state = nnx.split(model)
        self._state = state

        def apply(state, ids, mask):
            return nnx.merge(graphdef, state)(ids, mask)

        self._apply = jax.jit(apply)

    @property
    def seq_dim(self) -> int:
        """Width of the sequence embeddings (the MMDiT's ``joint_attention_dim``)."""
        return self.config.width

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding (the MMDiT's ``pooled_projection_dim``)."""
        return self.config.pooled_dim

    @property
    def max_length(self) -> int:
        """Length L of every encoded sequence."""
        return self.tokenizer.max_length

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32 (b, L), mask bool (b, L))``; see :class:`Tokenizer`."""
        return self.tokenizer(prompts)

    def encode(
        self, prompts: str | Sequence[str]
    ) -> tuple[Float[Array, "b l d"], Float[Array, "b p"]]:
        """Encode prompts: ``(seq_emb (b, L, seq_dim), pooled (b, pooled_dim))`` jnp float32.

        The batch is padded to the next power of two before the (jit-compiled) forward pass, so
        only a handful of batch sizes ever compile.
        """
        ids, mask = self.tokenizer(prompts)
        b = ids.shape[0]
        if b == 0:
            raise ValueError("prompts is empty")
        padded = 1 << (b - 1).bit_length()
        if padded != b:
            ids = np.concatenate([ids, np.repeat(ids[:1], padded - b, axis=0)], axis=0)
            mask = np.concatenate([mask, np.repeat(mask[:1], padded - b, axis=0)], axis=0)
        seq, pooled = self._apply(self._state, jnp.asarray(ids), jnp.asarray(mask))
        return seq[:b], pooled[:b]
