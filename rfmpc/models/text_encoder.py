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

:func:`load_text_encoder` loads the shipped asset (``rfmpc/assets/text_encoder/``: config.json,
model.safetensors, tokenizer.json) or any folder :func:`save_text_encoder` wrote.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from rfmpc.data.tokenizer import PromptTokenizer
from rfmpc.io import atomic_write_bytes

__all__ = [
    "DEFAULT_TEXT_ENCODER_DIR",
    "EncoderBlock",
    "PromptEncoder",
    "TextEncoder",
    "TextEncoderConfig",
    "load_text_encoder",
    "save_text_encoder",
]

#: Where the embedded default text encoder lives.
DEFAULT_TEXT_ENCODER_DIR = Path(__file__).resolve().parent.parent / "assets" / "text_encoder"
_FORMAT = "rfmpc-text-encoder"
_FORMAT_VERSION = 1


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


# ----------------------------------------------------------------------------- persistence


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

    Each file is written atomically (temp file, fsync, rename). ``metadata`` (JSON-able) is stored
    in ``config.json`` under ``"training"``.
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
    atomic_write_bytes(
        folder / "model.safetensors", safetensors.numpy.save(tensors, metadata={"format": "np"})
    )
    tokenizer.save(folder / "tokenizer.json")


def _load_model(folder: Path, config: TextEncoderConfig) -> TextEncoder:
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in {folder}")
    try:
        tensors = safetensors.numpy.load(path.read_bytes())
    except Exception as e:  # safetensors raises its own error types on corrupted files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
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


class PromptEncoder:
    """A trained :class:`TextEncoder` with its tokenizer: prompts -> (seq_emb, pooled).

    Attributes:
        model: the :class:`TextEncoder`.
        tokenizer: the :class:`~rfmpc.data.tokenizer.PromptTokenizer`.
        config: the model's :class:`TextEncoderConfig`.
        metadata: the training record stored with the weights (may be empty).
    """

    def __init__(
        self,
        model: TextEncoder,
        tokenizer: PromptTokenizer,
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
        """``(ids int32 (b, L), mask bool (b, L))``; see :class:`PromptTokenizer`."""
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
