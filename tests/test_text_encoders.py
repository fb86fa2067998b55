"""CLIP-L/G and T5 encoder parity with transformers (fp32), pooling rules, strict loading."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel, rel_max_err
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _meta_checkpoint import meta_source  # noqa: E402
from _torch_fixtures import (  # noqa: E402
    tiny_clip_text_model,
    tiny_t5_encoder,
    train_clip_tokenizer,
    train_t5_tokenizer,
)
from safetensors.numpy import load_file, save_file  # noqa: E402

from rfmpc.models.clip import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402
from rfmpc.models.t5 import T5Config, T5EncoderModel, relative_position_bucket  # noqa: E402
from weights_conversion import WeightLoadError  # noqa: E402
from weights_conversion.clip import convert_clip_params, load_clip_text  # noqa: E402
from weights_conversion.t5 import convert_t5_params, load_t5_encoder  # noqa: E402
from weights_conversion.torch_layout import abstract_model  # noqa: E402

TOL = 1e-4
PROMPTS = [
    "a red circle",
    "a large purple star at the bottom right on a striped background",
    "Two zebras & 3 quick foxes jump!",  # words outside the training corpus
]


def jitted(model):
    """``model(ids, mask)`` under ``jax.jit`` (one compile instead of eager per-op dispatch)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return lambda ids, mask=None: fn(
        state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)
    )


# ------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_tokenizers():
    return {"L": train_clip_tokenizer(), "G": train_clip_tokenizer(pad_token="!")}


def _build_clip(kind, tok, folder):
    """(tokenizer, torch reference, ours, folder). L: quick_gelu and the legacy
    ``eos_token_id=2`` pooling rule (as SD3's config); G: gelu, pad "!", first-eos rule."""
    ref = tiny_clip_text_model(
        kind,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=2 if kind == "L" else tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        seed=11 if kind == "L" else 12,
    )
    ref.save_pretrained(folder)
    return tok, ref, load_clip_text(folder), folder


@pytest.fixture(scope="module")
def clip_l(clip_tokenizers, tmp_path_factory):
    return _build_clip("L", clip_tokenizers["L"], tmp_path_factory.mktemp("clip_l"))


@pytest.fixture(scope="module")
def clip_g(clip_tokenizers, tmp_path_factory):
    return _build_clip("G", clip_tokenizers["G"], tmp_path_factory.mktemp("clip_g"))


@pytest.fixture(params=["L", "G"])
def clip_pair(request):
    return request.getfixturevalue("clip_l" if request.param == "L" else "clip_g")


def _torch_clip(ref, ids, mask=None):
    with torch.no_grad():
        return ref(
            torch.from_numpy(np.asarray(ids)),
            attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask)),
            output_hidden_states=True,
        )


@pytest.mark.parity
def test_clip_matches_transformers_sd3_style(clip_pair):
    """Padded to 77 tokens and no attention mask, exactly as SD3's pipeline calls CLIP."""
    tok, ref, ours, _ = clip_pair
    enc = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    ids = enc.input_ids
    assert len(set(enc.attention_mask.sum(-1))) == 3  # three different prompt lengths
    out_ref = _torch_clip(ref, ids)
    out = jitted(ours)(ids)
    assert len(out.hidden_states) == len(out_ref.hidden_states) == 3
    assert_close_rel(out.penultimate, out_ref.hidden_states[-2].numpy(), TOL, "penultimate")
    for i, (h, h_ref) in enumerate(zip(out.hidden_states, out_ref.hidden_states)):
        assert_close_rel(h, h_ref.numpy(), TOL, f"hidden_states[{i}]")
    assert_close_rel(out.last_hidden_state, out_ref.last_hidden_state.numpy(), TOL, "last")
    assert_close_rel(out.text_embeds, out_ref.text_embeds.numpy(), TOL, "text_embeds")
    assert out.text_embeds.shape == (3, ref.config.projection_dim)


@pytest.mark.parity
def test_clip_attention_mask_matches_transformers(clip_g):
    """The G-like tokenizer pads with "!" (not the eos), as SD3's second tokenizer."""
    tok, ref, ours, _ = clip_g
    enc = tok(PROMPTS, padding="longest", return_tensors="np")
    out_ref = _torch_clip(ref, enc.input_ids, enc.attention_mask)
    out = jitted(ours)(enc.input_ids, enc.attention_mask)
    assert_close_rel(out.penultimate, out_ref.hidden_states[-2].numpy(), TOL, "penultimate")
    assert_close_rel(out.last_hidden_state, out_ref.last_hidden_state.numpy(), TOL, "last")
    assert_close_rel(out.text_embeds, out_ref.text_embeds.numpy(), TOL, "text_embeds")


def _pool_check(ref, ours, ids, expected_pos, other_pos):
    out_ref = _torch_clip(ref, ids)
    with torch.no_grad():
        pooled_ref = ref.text_model(torch.from_numpy(ids)).pooler_output.numpy()
    out = jitted(ours)(ids)
    assert_close_rel(out.pooler_output, pooled_ref, TOL, "pooled")
    assert_close_rel(out.text_embeds, out_ref.text_embeds.numpy(), TOL, "text_embeds")
    last = np.asarray(out.last_hidden_state)
    np.testing.assert_allclose(out.pooler_output, last[np.arange(len(ids)), expected_pos])
    # the other rule would have pooled a different token: the test discriminates the rules
    assert rel_max_err(last[np.arange(len(ids)), other_pos], out.pooler_output) > 0.1


@pytest.mark.parity
def test_clip_pooling_rules_match_transformers(clip_pair, tmp_path):
    """eos_token_id == 2 (legacy): argmax(input_ids); otherwise the first eos position."""
    tok, ref, ours, folder = clip_pair
    v = len(tok)
    if ref.config.eos_token_id == 2:
        # no end-of-text token: the largest id (bos, v - 2) is at 0, token 2 sits at 1 or 2
        ids = np.array([[v - 2, 2, 50, 7, 9, 11], [5, v - 2, 2, 9, 2, 3]])
        _pool_check(ref, ours, ids, expected_pos=[0, 1], other_pos=[1, 2])
    else:
        # make a mid-vocabulary id the eos: larger ids exist, and it occurs twice
        cfg = json.loads((folder / "config.json").read_text())
        cfg["eos_token_id"] = 7
        folder7 = tmp_path / "eos7"
        shutil.copytree(folder, folder7)
        (folder7 / "config.json").write_text(json.dumps(cfg))
        ref7 = transformers.CLIPTextModelWithProjection.from_pretrained(folder7).eval()
        ours7 = load_clip_text(folder7)
        ids = np.array([[v - 2, 9, 7, 20, 7, v - 1], [v - 2, 7, v - 1, 7, 0, 0]])
        _pool_check(ref7, ours7, ids, expected_pos=[2, 1], other_pos=[0, 0])


def test_clip_config_from_hf(clip_pair):
    _, ref, ours, folder = clip_pair
    cfg = CLIPTextConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg == ours.config
    assert cfg.hidden_act == ref.config.hidden_act and cfg.eos_token_id == ref.config.eos_token_id
    full = {"model_type": "clip", "text_config": dict(ref.config.to_dict())}
    assert CLIPTextConfig.from_hf(full) == cfg
    assert CLIPTextConfig.from_hf({}) == CLIPTextConfig()
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextConfig.from_hf({"eos_token_id": [2, 3]})
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="swishy")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        ours(jnp.zeros((1, 4), jnp.float32))


def test_clip_ignores_position_ids_buffer_only(clip_pair, tmp_path):
    """Old checkpoints carry the position_ids buffer: ignored on purpose; nothing else is."""
    _, _, ours, folder = clip_pair
    dst = tmp_path / "clip"
    shutil.copytree(folder, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, dst / "model.safetensors")
    loaded = load_clip_text(dst)
    np.testing.assert_array_equal(
        loaded.text_projection.kernel[...], ours.text_projection.kernel[...]
    )
    tensors["logit_scale"] = np.zeros((), np.float32)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(WeightLoadError, match=r"unmapped key\(s\) 'logit_scale'"):
        load_clip_text(dst)


# --------------------------------------------------------------------------------------- T5


@pytest.fixture(scope="module")
def t5_setup(tmp_path_factory):
    tok = train_t5_tokenizer()
    ref = tiny_t5_encoder(vocab_size=-(-len(tok) // 8) * 8, seed=13)
    folder = tmp_path_factory.mktemp("t5")
    ref.save_pretrained(folder)
    return tok, ref, load_t5_encoder(folder), folder


@pytest.mark.parity
def test_t5_matches_transformers_with_and_without_mask(t5_setup):
    """32 tokens with 8 buckets and max distance 20: exact, log-spaced and clipped buckets in
    both directions. SD3 passes no mask (padding attended); with a mask, padding is hidden."""
    tok, ref, ours, _ = t5_setup
    enc = tok(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="np")
    ids, mask = enc.input_ids, enc.attention_mask
    assert mask[0].sum() < mask[1].sum() < 32
    with torch.no_grad():
        h_ref = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
        hm_ref = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        hm_ref = hm_ref.last_hidden_state.numpy()
    run = jitted(ours)
    h, hm = run(ids), run(ids, mask)
    assert h.shape == (3, 32, ref.config.d_model)
    assert_close_rel(h, h_ref, TOL, "T5 no mask")
    assert_close_rel(hm, hm_ref, TOL, "T5 with mask")
    assert rel_max_err(hm[0], h[0]) > 0.1  # the mask matters for a padded prompt


def test_relative_position_bucket_matches_transformers():
    attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    rel = torch.arange(-300, 301)[None, :] - torch.arange(0, 3)[:, None]
    for nb, md in [(32, 128), (8, 20), (64, 256), (32, 20), (16, 1000)]:
        for bidirectional in (True, False):
            want = attention._relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md
            ).numpy()
            got = relative_position_bucket(
                rel.numpy(), bidirectional=bidirectional, num_buckets=nb, max_distance=md
            )
            np.testing.assert_array_equal(got, want, err_msg=f"{nb=} {md=} {bidirectional=}")


@pytest.mark.parity
def test_t5_bfloat16_close_to_float32(t5_setup):
    tok, _, ours, folder = t5_setup
    ids = tok(PROMPTS, padding="max_length", max_length=32, return_tensors="np").input_ids
    h32 = jitted(ours)(ids)
    h16 = jitted(load_t5_encoder(folder, dtype=jnp.bfloat16))(ids)
    assert h16.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (relative rounding 2**-9); two random layers without
    # attention scaling amplify that to ~2% RMS (measured 1.5-2.2% over seeds)
    diff = np.asarray(h16.astype(jnp.float32) - h32)
    assert np.sqrt(np.mean(diff**2)) / np.std(np.asarray(h32)) < 0.05
    assert rel_max_err(h16.astype(jnp.float32), h32) < 0.3


def test_t5_tied_embedding_variants(t5_setup, tmp_path):
    _, _, ours, folder = t5_setup
    want = np.asarray(ours.shared.embedding[...])
    dst = tmp_path / "t5"
    shutil.copytree(folder, dst)
    path = dst / "model.safetensors"
    base = load_file(path)
    assert "shared.weight" in base and "encoder.embed_tokens.weight" not in base

    both = dict(base, **{"encoder.embed_tokens.weight": base["shared.weight"].copy()})
    save_file(both, path)
    np.testing.assert_array_equal(load_t5_encoder(dst).shared.embedding[...], want)

    only_tied = {
        ("encoder.embed_tokens.weight" if k == "shared.weight" else k): a for k, a in base.items()
    }
    save_file(only_tied, path)
    np.testing.assert_array_equal(load_t5_encoder(dst).shared.embedding[...], want)

    both["encoder.embed_tokens.weight"] = both["encoder.embed_tokens.weight"] + 1.0
    save_file(both, path)
    with pytest.raises(WeightLoadError, match="differ"):
        load_t5_encoder(dst)

    save_file({k: a for k, a in base.items() if k != "shared.weight"}, path)
    with pytest.raises(WeightLoadError, match=r"missing key 'shared\.weight'"):
        load_t5_encoder(dst)


def test_t5_config_from_hf(t5_setup):
    _, _, ours, folder = t5_setup
    cfg = T5Config.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg == ours.config and cfg.dense_act_fn == "gelu_new"
    assert cfg.inner_dim != cfg.d_model  # heads * d_kv differs from the width, as in T5 v1.1
    with pytest.raises(ValueError, match="gated"):
        T5Config.from_hf({"feed_forward_proj": "relu"})
    assert T5Config.from_hf({"feed_forward_proj": "gated-silu"}).dense_act_fn == "silu"
    with pytest.raises(ValueError, match="attention_mask"):
        ours(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))


# ------------------------------------------------------------------------- strict loading


def _check_strict_loading(load, folder, tmp_path, key, bad_shape):
    """Missing, extra and mis-shaped keys each raise WeightLoadError naming key and file."""
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    path = dst / "model.safetensors"
    base = load_file(path)
    good_shape = tuple(base[key].shape)

    save_file({k: a for k, a in base.items() if k != key}, path)
    with pytest.raises(WeightLoadError, match=f"missing key '{key}'"):
        load(dst)

    save_file(dict(base, extra_tensor=np.zeros(3, np.float32)), path)
    with pytest.raises(WeightLoadError, match=r"unmapped key\(s\) 'extra_tensor' \(model"):
        load(dst)

    save_file(dict(base, **{key: np.zeros(bad_shape, np.float32)}), path)
    with pytest.raises(WeightLoadError) as e:
        load(dst)
    msg = str(e.value)
    assert key in msg and str(bad_shape) in msg and str(good_shape) in msg
    assert "model.safetensors" in msg


def test_clip_strict_loading_errors(clip_l, tmp_path):
    _, _, _, folder = clip_l
    key = "text_model.encoder.layers.1.mlp.fc2.weight"
    _check_strict_loading(load_clip_text, folder, tmp_path, key, (32, 63))


def test_t5_strict_loading_errors(t5_setup, tmp_path):
    _, _, _, folder = t5_setup
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    _check_strict_loading(load_t5_encoder, folder, tmp_path, key, (127, 96))


# ---------------------------------------------------------------- full-size SD3 key maps

SD3_CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    eos_token_id=2,
)
SD3_CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
    eos_token_id=2,
)


@pytest.mark.parametrize("cfg", [SD3_CLIP_L, SD3_CLIP_G], ids=["clip_l", "clip_g"])
def test_sd3_clip_full_size_key_map(cfg):
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg))
    ours_cfg = CLIPTextConfig.from_hf(ref.config.to_dict())
    model = abstract_model(lambda rngs: CLIPTextModelWithProjection(ours_cfg, rngs=rngs))
    source = meta_source(ref)
    params = convert_clip_params(model, source)
    source.assert_all_consumed()
    assert sum(int(np.prod(a.shape)) for a in params.values()) == sum(
        p.numel() for p in ref.parameters()
    )


def test_sd3_t5_xxl_full_size_key_map():
    cfg = dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**cfg))
    ours_cfg = T5Config.from_hf(ref.config.to_dict())
    assert ours_cfg == T5Config()  # the defaults are T5-v1.1-XXL's
    model = abstract_model(lambda rngs: T5EncoderModel(ours_cfg, rngs=rngs))
    source = meta_source(ref, drop=("encoder.embed_tokens.weight",))  # tied: saved once
    params = convert_t5_params(model, source)
    source.assert_all_consumed()
    assert sum(int(np.prod(a.shape)) for a in params.values()) == sum(
        p.numel() for p in ref.parameters()
    )
