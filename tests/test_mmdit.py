"""SD3 MM-DiT: configs, fixed embeddings, parity with diffusers, strict loading, rfmpc format.

Parity: tiny random diffusers ``SD3Transformer2DModel``s (every parameter redrawn, see
``_diffusers_fixtures``) are saved to disk, loaded by rfmpc and compared on batch-2, non-square
latents at three timestep pairs with ``rel_max_err = max|ours - ref| / std(ref)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import _diffusers_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import assert_close_rel, rel_max_err
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding
from flax import nnx
from safetensors.torch import load_file, save_file

from rfmpc.convert import load_transformer  # diffusers or rfmpc folder
from rfmpc.models import (
    SD3_MEDIUM,
    SD35_LARGE,
    SD35_MEDIUM,
    MMDiT,
    MMDiTConfig,
    Transformer,
    save_transformer,
)
from rfmpc.models.mmdit import sincos_pos_embed_2d, timestep_embedding
from weights_conversion import WeightLoadError
from weights_conversion.mmdit import diffusers_key_map

# Batch-2 timestep pairs (timestep = sigma * 1000): high noise, middle, almost clean.
TIMESTEPS = [np.array([1000.0, 871.3]), np.array([500.0, 333.3]), np.array([2.5, 41.0])]

FP32_TOL = 1e-4
# bf16 compute path (bf16 params and matmuls; float32 norms, softmax, modulation, residuals)
# against the float32 diffusers reference. Measured over the fixture variants: 1.8e-2 .. 3.2e-2
# (diffusers' own bf16 forward against its float32 one: 2.8e-2 .. 4.7e-2 on the same models).
BF16_TOL = 5e-2


def _run(model, inp, t):
    out = model(
        jnp.asarray(inp["hidden_states"]),
        jnp.asarray(t, jnp.float32),
        jnp.asarray(inp["encoder_hidden_states"]),
        jnp.asarray(inp["pooled_projections"]),
    )
    return np.asarray(out, np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (diffusers model, folder of its fp32 save_pretrained), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = fx.make_model(fx.config(name), seed=len(cache))
            folder = fx.save(model, tmp_path_factory.mktemp(name))
            cache[name] = (model, folder)
        return cache[name]

    return get


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def test_config_defaults_match_diffusers():
    sig = inspect.signature(SD3Transformer2DModel.__init__)
    for field in dataclasses.fields(MMDiTConfig):
        assert getattr(MMDiTConfig(), field.name) == sig.parameters[field.name].default, field.name
    assert {f.name for f in dataclasses.fields(MMDiTConfig)} == set(sig.parameters) - {"self"}


def test_presets_are_the_released_models():
    for cfg in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE):
        assert (cfg.patch_size, cfg.in_channels, cfg.out_channels) == (2, 16, 16)
        assert (cfg.attention_head_dim, cfg.joint_attention_dim) == (64, 4096)
        assert (cfg.pooled_projection_dim, cfg.sample_size) == (2048, 128)
    assert (SD3_MEDIUM.num_layers, SD3_MEDIUM.inner_dim, SD3_MEDIUM.pos_embed_max_size) == (
        24,
        1536,
        192,
    )
    assert SD3_MEDIUM.qk_norm is None and SD3_MEDIUM.dual_attention_layers == ()
    assert (SD35_MEDIUM.num_layers, SD35_MEDIUM.inner_dim, SD35_MEDIUM.pos_embed_max_size) == (
        24,
        1536,
        384,
    )
    assert SD35_MEDIUM.dual_attention_layers == tuple(range(13))
    assert SD35_MEDIUM.qk_norm == "rms_norm"
    assert (SD35_LARGE.num_layers, SD35_LARGE.num_attention_heads, SD35_LARGE.inner_dim) == (
        38,
        38,
        2432,
    )
    assert SD35_LARGE.pos_embed_max_size == 192 and SD35_LARGE.qk_norm == "rms_norm"
    assert SD35_LARGE.caption_projection_dim == 2432


def test_config_roundtrip_through_diffusers():
    cfg = MMDiTConfig(**fx.config("sd35-medium-like"))
    d = cfg.to_diffusers()
    json.dumps(d)
    model = SD3Transformer2DModel.from_config(d)
    again = MMDiTConfig.from_diffusers(
        {**dict(model.config), "_class_name": "SD3Transformer2DModel", "_diffusers_version": "x"}
    )
    assert again == cfg
    assert MMDiTConfig.from_diffusers({"dual_attention_layers": [0, 1]}).dual_attention_layers == (
        0,
        1,
    )


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"qk_norm": "l2"}, "qk_norm"),
        ({"caption_projection_dim": 8}, "caption_projection_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"skip_layers": [1]}, "skip_layers"),
        ({"_class_name": "FluxTransformer2DModel"}, "FluxTransformer2DModel"),
    ],
)
def test_config_rejects_unsupported(bad, match):
    with pytest.raises(ValueError, match=match):
        MMDiTConfig.from_diffusers({**fx.config("sd3-medium-like"), **bad})


# ----------------------------------------------------------------------------------------------
# Fixed embeddings against diffusers' functions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (12, 12)])
def test_sincos_table_matches_diffusers(grid):
    ref = get_2d_sincos_pos_embed(16, grid, base_size=4, output_type="pt").numpy()
    ours = sincos_pos_embed_2d(16, *grid, base_size=4)
    np.testing.assert_allclose(ours.reshape(-1, 16), ref, rtol=0, atol=1e-7)
    traced = np.asarray(sincos_pos_embed_2d(16, *grid, base_size=4, xp=jnp))
    np.testing.assert_allclose(traced, ours, rtol=0, atol=2e-6)


def test_timestep_embedding_matches_diffusers():
    t = np.array([0.0, 1.0, 333.3, 999.0], np.float32)
    ref = get_timestep_embedding(
        torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0
    ).numpy()
    # float32 exp of the frequencies differs by an ulp between torch and XLA: |dt*w| <~ 6e-5
    np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t))), ref, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("name", list(fx.VARIANTS))
def test_parity_fp32(name, saved):
    model, folder = saved(name)
    cfg = fx.config(name)
    ours = load_transformer(folder)
    inp = fx.inputs(cfg, fx.VARIANTS[name][1])
    for t in TIMESTEPS:
        ref = fx.reference(model, inp, t)
        out = _run(ours, inp, t)
        assert out.shape == (*inp["hidden_states"].shape[:3], ref.shape[-1])
        assert_close_rel(out, ref, FP32_TOL, f"{name} t={t}")
    # A scalar timestep broadcasts over the batch.
    assert_close_rel(
        _run(ours, inp, 500.0),
        fx.reference(model, inp, [500.0, 500.0]),
        FP32_TOL,
        f"{name} scalar t",
    )


@pytest.mark.parity
def test_parity_sharded_checkpoint(saved, tmp_path):
    model, _ = saved("sd35-medium-like")
    folder = fx.save_sharded(model, tmp_path / "sharded", n_shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    ours = load_transformer(folder)
    inp = fx.inputs(fx.config("sd35-medium-like"), (8, 12), seed=1)
    t = TIMESTEPS[0]
    assert_close_rel(_run(ours, inp, t), fx.reference(model, inp, t), FP32_TOL, "sharded")


@pytest.mark.parity
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_parity_half_precision_checkpoints(dtype, saved, tmp_path):
    model, _ = saved("sd35-medium-like")
    folder = fx.save_cast(model, tmp_path / str(dtype), dtype)
    # The reference is diffusers itself running that checkpoint in float32.
    ref_model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = load_transformer(folder, dtype=jnp.float32)
    assert jax.tree.leaves(ours.params)[0].dtype == jnp.float32
    inp = fx.inputs(fx.config("sd35-medium-like"), (8, 12), seed=2)
    for t in TIMESTEPS[:2]:
        assert_close_rel(_run(ours, inp, t), fx.reference(ref_model, inp, t), FP32_TOL, str(dtype))


@pytest.mark.parity
@pytest.mark.parametrize("name", ["sd35-medium-like"])
def test_bf16_compute_path(name, saved):
    model, folder = saved(name)
    ours = load_transformer(folder, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(ours.params))
    inp = fx.inputs(fx.config(name), fx.VARIANTS[name][1])
    errs = []
    for t in TIMESTEPS:
        out = _run(ours, inp, t)
        assert np.all(np.isfinite(out))
        errs.append(rel_max_err(out, fx.reference(model, inp, t)))
    assert max(errs) <= BF16_TOL, f"{name}: bf16 relative max errors {errs}"


@pytest.mark.parametrize(
    "preset", [SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE], ids=["sd3-medium", "sd35-medium", "sd35-large"]
)
def test_key_map_covers_released_checkpoints(preset):
    """The key map of each released config equals diffusers' state dict, key for key and shape
    for shape (diffusers built on the meta device: no memory, no weights needed)."""
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**preset.to_diffusers())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    abstract = nnx.eval_shape(lambda: MMDiT(preset, rngs=nnx.Rngs(0)))
    got = {key: shape for key, shape, _ in diffusers_key_map(abstract).values()}
    assert got == want


# ----------------------------------------------------------------------------------------------
# Strict loading errors
# ----------------------------------------------------------------------------------------------


def _tampered(saved, tmp_path, edit):
    _, folder = saved("sd3-medium-like")
    out = tmp_path / "tampered"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    edit(state)
    save_file(state, out / "diffusion_pytorch_model.safetensors")
    return out


def test_missing_key_raises(saved, tmp_path):
    key = "transformer_blocks.1.attn.to_k.weight"
    folder = _tampered(saved, tmp_path, lambda s: s.pop(key))
    with pytest.raises(WeightLoadError, match=key) as e:
        load_transformer(folder)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_extra_key_raises(saved, tmp_path):
    key = "transformer_blocks.0.attn.surprise.weight"
    folder = _tampered(saved, tmp_path, lambda s: s.update({key: torch.zeros(3)}))
    with pytest.raises(WeightLoadError, match=key) as e:
        load_transformer(folder)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_misshaped_key_raises(saved, tmp_path):
    key = "proj_out.weight"
    folder = _tampered(saved, tmp_path, lambda s: s.update({key: torch.zeros(16, 15)}))
    with pytest.raises(WeightLoadError, match=key) as e:
        load_transformer(folder)
    msg = str(e.value)
    assert "(16, 15)" in msg and "(16, 16)" in msg
    assert "diffusion_pytorch_model.safetensors" in msg


def test_config_weights_mismatch_raises(saved, tmp_path):
    _, folder = saved("sd3-medium-like")
    out = tmp_path / "mismatch"
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_layers": 4}))
    (out / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(WeightLoadError, match="transformer_blocks"):
        load_transformer(out)


def test_truncated_file_raises(saved, tmp_path):
    _, folder = saved("sd3-medium-like")
    out = tmp_path / "truncated"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (out / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightLoadError, match="truncated") as e:
        load_transformer(out)
    assert "diffusion_pytorch_model.safetensors" in str(e.value)


def test_index_with_missing_shard_raises(saved, tmp_path):
    model, _ = saved("sd3-medium-like")
    folder = fx.save_sharded(model, tmp_path / "sharded", n_shards=2)
    gone = "diffusion_pytorch_model-00002-of-00002.safetensors"
    (folder / gone).unlink()
    with pytest.raises(WeightLoadError, match=gone):
        load_transformer(folder)


# ----------------------------------------------------------------------------------------------
# rfmpc format, jit/pytree behaviour, input validation, training from scratch
# ----------------------------------------------------------------------------------------------


def test_rfmpc_format_roundtrip(saved, tmp_path):
    _, folder = saved("sd35-large-like")
    ours = load_transformer(folder)
    out_folder = save_transformer(ours, tmp_path / "rf")
    meta = json.loads((out_folder / "config.json").read_text())
    assert meta["_rfmpc_kind"] == "mmdit"
    assert not list(out_folder.glob(".*.tmp"))
    again = load_transformer(out_folder)
    assert again.config == ours.config
    inp = fx.inputs(fx.config("sd35-large-like"), (10, 6))
    np.testing.assert_array_equal(_run(again, inp, TIMESTEPS[1]), _run(ours, inp, TIMESTEPS[1]))
    halved = load_transformer(out_folder, dtype=jnp.bfloat16)
    assert jax.tree.leaves(halved.params)[0].dtype == jnp.bfloat16
    # the models layer reads rfmpc's format alone (it never imports weights_conversion)
    from rfmpc import models

    mine = models.load_transformer(out_folder)
    np.testing.assert_array_equal(_run(mine, inp, TIMESTEPS[1]), _run(ours, inp, TIMESTEPS[1]))
    with pytest.raises(ValueError, match=r"rfmpc\.convert\.load_transformer"):
        models.load_transformer(folder)


def test_rfmpc_format_is_strict(saved, tmp_path):
    _, folder = saved("sd3-medium-like")
    out = save_transformer(load_transformer(folder), tmp_path / "rf")
    weights = out / "model.safetensors"
    state = load_file(weights)
    state["pos_embed.stray"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(WeightLoadError, match=r"pos_embed\.stray"):
        load_transformer(out)
    state.pop("pos_embed.stray")
    state.pop("transformer_blocks.0.attn.to_q.kernel")
    save_file(state, weights)
    with pytest.raises(WeightLoadError, match=r"transformer_blocks\.0\.attn\.to_q\.kernel"):
        load_transformer(out)


def test_transformer_is_a_pytree_and_differentiable(saved):
    name = "patch4-outch-fp32ln"  # the two-block variant: the cheapest backward to compile
    ours = load_transformer(saved(name)[1])
    inp = fx.inputs(fx.config(name), fx.VARIANTS[name][1])
    args = [
        jnp.asarray(inp[k])
        for k in ("hidden_states", "encoder_hidden_states", "pooled_projections")
    ]
    t = jnp.asarray(TIMESTEPS[1], jnp.float32)
    direct = ours(args[0], t, args[1], args[2])
    # A pytree: flattening and rebuilding gives a working model (jit arguments need this).
    leaves, treedef = jax.tree.flatten(ours)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(np.asarray(rebuilt(args[0], t, args[1], args[2])), direct)
    # Gradient w.r.t. the latent through the pure apply, checked by a central difference.
    w = jax.random.normal(jax.random.key(1), direct.shape)
    f = lambda x: jnp.vdot(w, ours(x, t, args[1], args[2]))
    loss = lambda params, x: jnp.vdot(w, ours.apply(params, x, t, args[1], args[2]))
    g = jax.jit(jax.grad(loss, argnums=1))(ours.params, args[0])
    d = jax.random.normal(jax.random.key(0), args[0].shape)
    eps = 1e-2
    fd = (f(args[0] + eps * d) - f(args[0] - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=2e-3)
    assert isinstance(ours, Transformer) and ours.module.config == ours.config


@pytest.mark.parametrize(
    "shape_kw, match",
    [
        (dict(x=(2, 8, 12, 3)), "hidden_states"),
        (dict(x=(2, 7, 12, 4)), "patch_size"),
        (dict(x=(2, 26, 12, 4)), "pos_embed_max_size"),
        (dict(ctx=(2, 7, 23)), "encoder_hidden_states"),
        (dict(pooled=(1, 20)), "pooled_projections"),
        (dict(t=(3,)), "timestep"),
    ],
)
def test_bad_inputs_raise(shape_kw, match, saved):
    model = load_transformer(saved("sd3-medium-like")[1])  # errors are raised while tracing
    shapes = dict(x=(2, 8, 12, 4), ctx=(2, 7, 24), pooled=(2, 20), t=(2,))
    shapes.update(shape_kw)
    with pytest.raises(ValueError, match=match):
        model(*(jnp.zeros(shapes[k]) for k in ("x", "t", "ctx", "pooled")))


def test_trains_from_scratch(getkey):
    """A small pixel-space MM-DiT (3 channels, patch 4) fits a fixed batch with optax."""
    cfg = MMDiTConfig(
        sample_size=16,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=32,
        pooled_projection_dim=8,
        pos_embed_max_size=4,
    )
    model = MMDiT(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x0 = jax.random.normal(getkey(), (4, 16, 16, 3))
    noise = jax.random.normal(getkey(), (4, 16, 16, 3))
    sigma = jax.random.uniform(getkey(), (4,))
    xs = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    ctx = jax.random.normal(getkey(), (4, 5, 8))
    pooled = jax.random.normal(getkey(), (4, 8))

    def loss_fn(m):
        return jnp.mean((m(xs, sigma * 1000, ctx, pooled) - (noise - x0)) ** 2)

    @nnx.jit
    def step(m, o):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses
    # The position table is a buffer, not a parameter: training leaves it alone.
    table = sincos_pos_embed_2d(32, 4, 4, 4)
    np.testing.assert_array_equal(np.asarray(model.pos_embed.pos_embed[...]), table)
