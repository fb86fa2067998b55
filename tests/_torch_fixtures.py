"""Tiny, random, fully offline PyTorch reference models and tokenizers for tests.

Everything here is built locally in a second or two, reproducibly: tokenizers are learned
from a small procedural corpus (with the ``tokenizers`` library's CLIP normaliser and
pre-tokeniser, BPE and Unigram models) and wrapped in transformers' ``CLIPTokenizer`` /
``T5TokenizerFast``; models are constructed from tiny configs and
re-initialised by :func:`randomize_` with non-trivial weights (norm scales away from 1,
biases away from 0), so parity tests exercise every parameter. Nothing touches a model hub.

:func:`build_tiny_sd3_pipeline` assembles a diffusers ``StableDiffusion3Pipeline`` whose sizes
fit together the way SD3's do: the CLIP-L and CLIP-G penultimate states are concatenated on
the feature axis (32 + 48 = 80) and zero-padded to the T5 width (96 = the transformer's
``joint_attention_dim``); the pooled projections are concatenated (32 + 48 = 80 = the
transformer's ``pooled_projection_dim``). Requires torch, transformers and diffusers.
"""

from __future__ import annotations

import itertools
import math
import os
import string
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CORPUS",
    "build_tiny_sd3_pipeline",
    "randomize_",
    "tiny_clip_text_model",
    "tiny_t5_encoder",
    "tiny_vae",
    "train_clip_tokenizer",
    "train_t5_tokenizer",
]


def _corpus() -> list[str]:
    sizes = ["small", "large", "tiny", "huge"]
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "ring"]
    places = ["in the top left corner", "at the bottom right", "in the centre", "on the left"]
    backs = ["on a grey background", "on a striped background", "over a plain wall"]
    out = []
    for i, (s, c, sh) in enumerate((s, c, sh) for s in sizes for c in colours for sh in shapes):
        out.append(f"a {s} {c} {sh} {places[i % len(places)]} {backs[i % len(backs)]}")
    out += [
        "a photo of a cat sitting on a mat, highly detailed, 4k",
        "an astronaut riding a horse on the moon!",
        "Two dogs play with 3 balls; the sky is cloudy.",
    ]
    return out


CORPUS: tuple[str, ...] = tuple(_corpus())
"""The procedural sentences the fixture tokenizers are trained on."""

_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)


def _clip_pre_tokenizer():
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, pre


def _learn_bpe(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Sennrich et al.'s BPE on ``words`` (symbol tuples -> counts): repeatedly merge the most
    frequent adjacent pair, ties broken by the pair itself, so the result is deterministic."""
    merges: list[tuple[str, str]] = []
    vocab = Counter(words)
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in vocab.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter = Counter()
        for word, count in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        vocab = merged
    return merges


def train_clip_tokenizer(
    *, num_merges: int = 200, model_max_length: int = 77, pad_token: str = "<|endoftext|>"
):
    """A CLIP byte-level BPE tokenizer learned from :data:`CORPUS`.

    Words come from CLIP's own normaliser and pre-tokeniser (``tokenizers``); merges are
    learned by :func:`_learn_bpe` (``tokenizers``' ``BpeTrainer`` breaks ties in hash order,
    so its vocabulary changes from one process to the next). Like OpenAI's vocabulary it holds
    every byte symbol with and without the ``</w>`` end-of-word suffix, then the merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` as the two largest ids (so the legacy "argmax
    id" pooling rule finds the end-of-text token). ``pad_token="!"`` mimics SD3's second
    tokenizer.
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    normalizer, pre = _clip_pre_tokenizer()
    words: Counter = Counter()
    for line in CORPUS:
        for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            words[(*w[:-1], w[-1] + "</w>")] += 1
    merges = _learn_bpe(words, num_merges)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    known = set(tokens)
    for a, b in merges:
        if a + b not in known:
            known.add(a + b)
            tokens.append(a + b)
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # transformers 5 needs (a, b) tuples, not "a b" strings
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


def train_t5_tokenizer(*, model_max_length: int = 512):
    """A T5 (sentencepiece-style Unigram) tokenizer estimated from :data:`CORPUS`.

    Pieces: ``▁`` and every ASCII letter, digit and punctuation mark (so nothing is unknown
    in ASCII text), plus one ``▁word`` piece per corpus word; scores are log relative
    frequencies (characters add-one smoothed), a one-step unigram language model estimate.
    (``tokenizers``' ``UnigramTrainer`` keeps mostly single characters on a corpus this small
    and is not reproducible across processes.) Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>``
    as in T5; pieces follow by decreasing score; no ``<extra_id_*>`` sentinels. Tokenisation
    is ``tokenizers``' Unigram (Viterbi) model inside transformers' ``T5TokenizerFast``.
    """
    from transformers import T5TokenizerFast

    counts: Counter = Counter(string.ascii_letters + string.digits + string.punctuation)
    for line in CORPUS:
        for w in line.split():
            counts["▁"] += 1
            counts["▁" + w] += 1
            counts.update(w)
    total = sum(counts.values())
    scores = {p: math.log(c / total) for p, c in counts.items()}
    pieces = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def randomize_(module, seed: int):
    """Overwrite every parameter of a torch ``module`` in place, deterministically.

    1-D ``*weight`` (norm scales): 1 + 0.2 N(0,1); other 1-D (biases): 0.2 N(0,1); token,
    position and relative-position embeddings: N(0,1); other weights: N(0,1)/sqrt(fan_in).
    Returns ``module``.
    """
    import torch

    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1:
                z = 1 + 0.2 * z if name.endswith("weight") else 0.2 * z
            elif any(s in name for s in ("embedding", "shared", "embed_tokens")):
                pass
            else:
                z = z / np.sqrt(float(np.prod(p.shape[1:])))
            p.copy_(z.to(p.dtype))
    return module


def tiny_clip_text_model(
    kind: str,
    *,
    vocab_size: int,
    eos_token_id: int,
    bos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
    hidden_size: int | None = None,
    projection_dim: int | None = None,
    num_hidden_layers: int = 2,
    max_position_embeddings: int = 77,
):
    """A tiny random transformers ``CLIPTextModelWithProjection``.

    ``kind="L"``: CLIP-L-like (``quick_gelu``, hidden 32); ``kind="G"``: OpenCLIP-bigG-like
    (``gelu``, hidden 48). Pass ``eos_token_id=2`` for the legacy pooling rule.
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if kind not in ("L", "G"):
        raise ValueError(f"kind must be 'L' or 'G', got {kind!r}")
    hidden = hidden_size or (32 if kind == "L" else 48)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim or hidden,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=max_position_embeddings,
        hidden_act="quick_gelu" if kind == "L" else "gelu",
        layer_norm_eps=1e-5,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        model = CLIPTextModelWithProjection(cfg)
    return randomize_(model, seed).eval()


def tiny_t5_encoder(
    *,
    vocab_size: int,
    seed: int = 0,
    d_model: int = 96,
    d_kv: int = 16,
    num_heads: int = 4,
    d_ff: int = 128,
    num_layers: int = 2,
    relative_attention_num_buckets: int = 8,
    relative_attention_max_distance: int = 20,
):
    """A tiny random transformers ``T5EncoderModel`` (v1.1: gated-gelu, no biases).

    Few buckets and a short ``max_distance`` so that a sequence of a few dozen tokens uses the
    exact, the log-spaced and the clipped buckets in both directions. ``num_heads * d_kv``
    differs from ``d_model`` as in T5-v1.1-small.
    """
    import torch
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=relative_attention_num_buckets,
        relative_attention_max_distance=relative_attention_max_distance,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        model = T5EncoderModel(cfg)
    return randomize_(model, seed).eval()


def tiny_vae(
    *,
    seed: int = 0,
    quant_conv: bool = False,
    block_out_channels: tuple[int, ...] = (16, 32, 32),
    norm_num_groups: int = 8,
):
    """A tiny random diffusers ``AutoencoderKL``.

    ``quant_conv=False``: SD3-like (16 latent channels, no quant convs, scaling 1.5305, shift
    0.0609). ``quant_conv=True``: SD1/SDXL-like (4 latent channels, both 1x1 quant convs,
    scaling 0.18215, no shift). Downsampling factor ``2 ** (len(block_out_channels) - 1)``.
    """
    import torch
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    kw: dict[str, Any] = (
        dict(latent_channels=4, scaling_factor=0.18215, shift_factor=None)
        if quant_conv
        else dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    )
    with torch.random.fork_rng(devices=[]):
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            norm_num_groups=norm_num_groups,
            sample_size=32,
            use_quant_conv=quant_conv,
            use_post_quant_conv=quant_conv,
            **kw,
        )
    return randomize_(model, seed).eval()


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def build_tiny_sd3_pipeline(
    folder: str | os.PathLike,
    *,
    seed: int = 0,
    with_t5: bool = True,
    transformer_overrides: Mapping[str, Any] | None = None,
):
    """Build, save and reload a tiny random diffusers ``StableDiffusion3Pipeline``.

    Components (each re-initialised with :func:`randomize_` from its own seed derived from
    ``seed``): CLIP-L-like (hidden 32, legacy ``eos_token_id=2`` like SD3's config) and
    CLIP-G-like (hidden 48, pad token ``"!"`` like SD3's ``tokenizer_2``) text encoders sharing
    one trained BPE vocabulary; a T5 encoder (d_model 96) with a trained Unigram tokenizer,
    or none when ``with_t5=False``; a 16-channel VAE with downsampling factor 4; an
    ``SD3Transformer2DModel`` with 2 layers, 4 heads of 8, patch 2, ``joint_attention_dim``
    96, ``pooled_projection_dim`` 80, ``sample_size`` 16 (64-pixel default images);
    ``transformer_overrides`` replaces any of its config entries (e.g.
    ``{"qk_norm": "rms_norm", "dual_attention_layers": (0,)}`` for an SD3.5-like one); and
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

    Saves with ``save_pretrained(folder)``, reloads with ``from_pretrained(folder,
    local_files_only=True)``, checks every reloaded weight equals the built one (raises
    ``RuntimeError`` otherwise) and returns the reloaded pipeline.
    """
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    folder = Path(folder)
    tokenizer = train_clip_tokenizer()
    tokenizer_2 = train_clip_tokenizer(pad_token="!")
    v = len(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder = tiny_clip_text_model(
        "L", vocab_size=v, bos_token_id=bos, eos_token_id=2, pad_token_id=1, seed=seed + 1
    )
    text_encoder_2 = tiny_clip_text_model(
        "G",
        vocab_size=v,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer_2.pad_token_id,
        seed=seed + 2,
    )
    joint_dim = 96
    if with_t5:
        tokenizer_3 = train_t5_tokenizer()
        vocab_3 = -(-len(tokenizer_3) // 8) * 8  # padded like T5's 32128 for 32100 pieces
        text_encoder_3 = tiny_t5_encoder(vocab_size=vocab_3, d_model=joint_dim, seed=seed + 3)
    else:
        tokenizer_3 = text_encoder_3 = None
    vae = tiny_vae(seed=seed + 4)
    tcfg: dict[str, Any] = dict(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint_dim,
        caption_projection_dim=32,
        pooled_projection_dim=(
            text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
        ),
        pos_embed_max_size=16,
    )
    tcfg.update(transformer_overrides or {})
    with torch.random.fork_rng(devices=[]):
        transformer = SD3Transformer2DModel(**tcfg)
    randomize_(transformer, seed + 5).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    # a pipeline saved without T5 must be told so when reloaded (diffusers' documented usage)
    no_t5 = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    loaded = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **no_t5)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        built, back = getattr(pipe, name), getattr(loaded, name)
        if (built is None) != (back is None) or (
            built is not None and not _same_weights(built, back)
        ):
            raise RuntimeError(f"{folder}: {name} did not round-trip through save_pretrained")
    return loaded
