"""Tokenizer, text encoder module, persistence, the shipped encoder's ranking property, training."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rfmpc.data import STYLES, VOCABULARY, PromptTokenizer, sample_scene, split_words, to_prompt
from rfmpc.data.text_encoder_io import (
    DEFAULT_TEXT_ENCODER_DIR,
    load_text_encoder,
    save_text_encoder,
)
from rfmpc.data.train_text import (
    TrainTextConfig,
    mutate_scene,
    ranking_report,
    scene_similarity,
    shared_attributes,
    train_text_encoder,
)
from rfmpc.models.text_encoder import TextEncoder, TextEncoderConfig

TINY = TextEncoderConfig(
    vocab_size=64, max_length=32, width=32, depth=1, num_heads=2, pooled_dim=16
)


@pytest.fixture(scope="module")
def tokenizer():
    return PromptTokenizer.train()


@pytest.fixture(scope="module")
def shipped():
    return load_text_encoder()


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_knows_the_grammar_and_matches_split_words(tokenizer, tmp_path):
    vocab = tokenizer.tokenizer.get_vocab()
    assert set(VOCABULARY) <= set(vocab)
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id) == (0, 1, 2)
    rng = np.random.default_rng(0)
    prompts = [to_prompt(sample_scene(rng, gradient_fraction=0.5), s) for s in STYLES] * 3
    ids, mask = tokenizer(prompts)
    assert ids.shape == mask.shape == (len(prompts), tokenizer.max_length)
    assert ids.dtype == np.int32 and mask.dtype == bool
    for p, row, m in zip(prompts, ids, mask):
        words = split_words(p)
        assert m.sum() == len(words) + 1 and m[: len(words) + 1].all()
        assert tokenizer.tokens(p)[1 : len(words) + 1] == words  # token i+1 = word i
        assert row[0] == tokenizer.cls_id and tokenizer.unk_id not in row
        assert (row[~m] == tokenizer.pad_id).all()
    assert tokenizer("a pink circle")[0][0, 2] == tokenizer.unk_id
    # Deterministic training; save/load round trip.
    assert PromptTokenizer.train().tokenizer.to_str() == tokenizer.tokenizer.to_str()
    tokenizer.save(tmp_path)
    again = PromptTokenizer.load(tmp_path / "tokenizer.json")
    assert np.array_equal(again(prompts)[0], ids)
    # Too long: truncated to max_length.
    long_ids, long_mask = tokenizer(" ".join(["red"] * 100))
    assert long_ids.shape == (1, tokenizer.max_length) and long_mask.all()


# ----------------------------------------------------------------------------- module


def test_encoder_shapes_and_padding_invariance():
    model = TextEncoder(TINY, rngs=nnx.Rngs(0))
    apply = nnx.jit(lambda m, i, k: m(i, k))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 64, size=(3, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] < np.asarray([12, 5, 1])[:, None])
    seq, pooled = apply(model, ids, mask)
    assert seq.shape == (3, 12, 32) and pooled.shape == (3, 16)
    assert bool(jnp.all(jnp.isfinite(seq))) and bool(jnp.all(jnp.isfinite(pooled)))
    # Changing padded tokens changes nothing at real positions nor the pooled embedding.
    ids2 = jnp.where(mask, ids, 7)
    seq2, pooled2 = apply(model, ids2, mask)
    real = np.asarray(mask)[..., None]
    np.testing.assert_allclose(np.where(real, seq2, 0), np.where(real, seq, 0), atol=1e-5)
    np.testing.assert_allclose(pooled2, pooled, atol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        apply(model, jnp.zeros((1, 40), jnp.int32), jnp.ones((1, 40), bool))
    with pytest.raises(ValueError, match="divisible"):
        TextEncoderConfig(vocab_size=10, width=30, num_heads=4)


def test_save_load_round_trip_and_strict_loading(tokenizer, tmp_path):
    cfg = TextEncoderConfig(
        vocab_size=tokenizer.vocab_size, width=32, depth=1, num_heads=2, pooled_dim=16
    )
    model = TextEncoder(cfg, rngs=nnx.Rngs(1))
    save_text_encoder(tmp_path, model, tokenizer, metadata={"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json",
    ]  # fmt: skip
    loaded = load_text_encoder(tmp_path)
    assert loaded.metadata == {"note": "test"}
    ours = nnx.to_flat_state(nnx.state(model, nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)))
    assert len(ours) == len(theirs) > 0
    for key, value in ours:
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(theirs[key][...]))
    # A config that does not match the weights is refused, naming the tensor.
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["config"]["pooled_dim"] = 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="pooled_proj"):
        load_text_encoder(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_text_encoder(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- similarity oracle


def test_scene_similarity_and_mutations():
    rng = np.random.default_rng(3)
    for _ in range(100):
        s = sample_scene(rng)
        n = 1 + 4 * len(s.objects)
        assert shared_attributes(s, s) == (n, n) and scene_similarity(s, s) == 1.0
        k = int(rng.integers(1, 5))
        m = mutate_scene(s, rng, k)
        assert shared_attributes(s, m) == (n - k, n)
        assert shared_attributes(m, s) == (n - k, n)


# ----------------------------------------------------------------------------- shipped encoder


def test_shipped_encoder_interface(shipped):
    assert (DEFAULT_TEXT_ENCODER_DIR / "model.safetensors").is_file()
    prompts = ["a red circle at the top left on a blue background", "top-left red circle, blue"]
    seq, pooled = shipped.encode(prompts + prompts[:1])  # padded to a batch of 4 inside
    assert seq.shape == (3, shipped.max_length, shipped.seq_dim)
    assert pooled.shape == (3, shipped.pooled_dim)
    assert isinstance(seq, jax.Array) and seq.dtype == jnp.float32
    # Same numbers as the module itself on the unpadded batch.
    ids, mask = shipped.tokenize(prompts + prompts[:1])
    seq2, pooled2 = nnx.jit(lambda m, i, k: m(i, k))(shipped.model, ids, mask)
    np.testing.assert_allclose(np.asarray(seq), np.asarray(seq2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(pooled2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(seq[2]), np.asarray(seq[0]), rtol=1e-5, atol=1e-5)


def test_shipped_encoder_ranks_prompts_by_shared_attributes(shipped):
    r = ranking_report(shipped, n_anchors=50, seed=1)
    print(json.dumps(r, indent=1))
    assert r["mean_cos_paraphrase"] > r["mean_cos_one_diff"] > r["mean_cos_several_diff"]
    by = r["mean_cos_by_shared"]
    assert by[5] > by[4] > by[3] > by[2] > by[1]
    assert r["spearman"] >= 0.85
    # Binding: exchanging the colours of two objects is further than a paraphrase.
    assert r["two_object_mean_cos_paraphrase"] > r["two_object_mean_cos_swapped"] + 0.03


# ----------------------------------------------------------------------------- training


def test_training_entry_point_reduces_the_loss(tmp_path):
    cfg = TrainTextConfig(
        encoder=TextEncoderConfig(vocab_size=1, width=32, depth=1, num_heads=2, pooled_dim=16),
        steps=40,
        batch_scenes=8,
        lr=1e-2,
        warmup=5,
        eval_scenes=0,
    )
    encoder, history = train_text_encoder(cfg, out_dir=tmp_path, verbose=False)
    loss = history["loss"]
    assert len(loss) == 40 and np.all(np.isfinite(loss))
    assert np.mean(loss[-5:]) < 0.85 * np.mean(loss[:5])
    loaded = load_text_encoder(tmp_path)
    assert loaded.metadata["steps"] == 40 and loaded.metadata["final_loss"] == round(loss[-1], 5)
    ours = dict(nnx.to_flat_state(nnx.state(encoder.model, nnx.Param)))
    for key, value in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(ours[key][...]))
