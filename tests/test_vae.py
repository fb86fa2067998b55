"""AutoencoderKL parity with diffusers (fp32), strict weight loading and full-size key maps."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_rel
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _meta_checkpoint import meta_source  # noqa: E402
from _torch_fixtures import tiny_vae  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from rfmpc.models.vae import (  # noqa: E402
    AutoencoderKL,
    VAEConfig,
    latents_to_model,
    model_to_latents,
    sample_latents,
)
from weights_conversion import WeightLoadError  # noqa: E402
from weights_conversion.torch_layout import abstract_model  # noqa: E402
from weights_conversion.vae import convert_vae_params, load_vae  # noqa: E402

TOL = 1e-4
VARIANTS = ["sd3", "quant_conv"]


def nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=VARIANTS)
def vae_pair(request, tmp_path_factory):
    """(torch reference, our loaded model, folder) for one tiny VAE variant."""
    # two levels: identity and 1x1-conv skips, one down/upsample, attention, quant convs
    ref = tiny_vae(seed=3, quant_conv=request.param == "quant_conv", block_out_channels=(16, 32))
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref.save_pretrained(folder)
    return ref, load_vae(folder), folder


def jitted(model, method):
    """``model.method`` under ``jax.jit`` (one compile, instead of eager per-op dispatch)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))
    return lambda x: fn(state, x)


@pytest.mark.parity
def test_encode_matches_diffusers(vae_pair):
    """Batch 2 of non-square 21 x 30 images: the odd height makes diffusers' asymmetric
    (0, 1, 0, 1) padding before each stride-2 conv decide the latent grid."""
    ref, ours, _ = vae_pair
    x = np.random.default_rng(0).uniform(-1, 1, (2, 21, 30, 3)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(nchw(x))).latent_dist
    mean, logvar = jitted(ours, "encode")(jnp.asarray(x))
    assert mean.shape == nhwc(dist.mean).shape == (2, 10, 15, ref.config.latent_channels)
    assert_close_rel(mean, nhwc(dist.mean), TOL, "encode mean")
    assert_close_rel(logvar, nhwc(dist.logvar), TOL, "encode logvar")


@pytest.mark.parity
def test_decode_matches_diffusers(vae_pair):
    ref, ours, _ = vae_pair
    c = ref.config.latent_channels
    z = np.random.default_rng(1).standard_normal((2, 5, 7, c)).astype(np.float32)
    with torch.no_grad():
        img = ref.decode(torch.from_numpy(nchw(z))).sample
    out = jitted(ours, "decode")(jnp.asarray(z))
    assert out.shape == (2, 10, 14, 3)
    assert_close_rel(out, nhwc(img), TOL, "decode")


def test_sample_latents_is_keyed_reparameterisation():
    rng = np.random.default_rng(3)
    mean = jnp.asarray(rng.standard_normal((1, 2, 3, 4)), jnp.float32)
    logvar = jnp.asarray(rng.uniform(-2, 1, (1, 2, 3, 4)), jnp.float32)
    sample = jax.jit(sample_latents)
    z1 = sample(jax.random.key(0), mean, logvar)
    z2 = sample(jax.random.key(0), mean, logvar)
    z3 = sample(jax.random.key(1), mean, logvar)
    np.testing.assert_array_equal(z1, z2)
    assert not np.allclose(z1, z3)
    # same key, shifted mean and log-variance + 2: z - mean scales by exp(2 / 2)
    z4 = sample(jax.random.key(0), mean + 1.0, logvar + 2.0)
    np.testing.assert_allclose(z4 - (mean + 1.0), np.e * (z1 - mean), rtol=1e-5, atol=1e-6)


def test_latent_scaling_matches_sd3_pipeline(vae_pair):
    ref, ours, _ = vae_pair
    cfg = ours.config
    z = np.random.default_rng(4).standard_normal((1, 3, 3, cfg.latent_channels)).astype(np.float32)
    shift = ref.config.shift_factor or 0.0
    # diffusers SD3: latents = (vae_latents - shift) * scale; decode((latents / scale) + shift)
    np.testing.assert_allclose(
        latents_to_model(jnp.asarray(z), cfg), (z - shift) * ref.config.scaling_factor, rtol=1e-6
    )
    np.testing.assert_allclose(
        model_to_latents(latents_to_model(jnp.asarray(z), cfg), cfg), z, rtol=1e-5, atol=1e-6
    )
    assert cfg.scaling_factor == ref.config.scaling_factor
    assert cfg.downsample_factor == 2


def test_config_from_diffusers_json(vae_pair):
    ref, ours, folder = vae_pair
    cfg = VAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    assert cfg == ours.config
    assert cfg.use_quant_conv == ref.config.use_quant_conv
    assert cfg.latent_channels == ref.config.latent_channels
    assert VAEConfig.from_diffusers({}) == VAEConfig()  # diffusers' defaults
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_diffusers({"block_out_channels": [32], "down_block_types": ["Foo"]})
    with pytest.raises(ValueError, match="latents_mean"):
        VAEConfig.from_diffusers({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(48,), norm_num_groups=32)


def test_bad_inputs_raise(vae_pair):
    _, ours, _ = vae_pair
    with pytest.raises(ValueError, match="NHWC"):
        ours.encode(jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="NHWC"):
        ours.decode(jnp.zeros((1, 2, 2, 3)))
    with pytest.raises(TypeError, match="VAEConfig"):
        AutoencoderKL({"latent_channels": 4}, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- strict loading


@pytest.fixture(scope="module")
def sd3_vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_err")
    tiny_vae(seed=5, block_out_channels=(16, 32)).save_pretrained(folder)
    return folder


def _rewrite(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_key_raises(sd3_vae_folder, tmp_path):
    folder = _copy(sd3_vae_folder, tmp_path / "vae")
    key = "decoder.up_blocks.0.upsamplers.0.conv.weight"
    _rewrite(folder, lambda t: t.pop(key))
    with pytest.raises(WeightLoadError, match=r"missing key .*upsamplers\.0\.conv\.weight"):
        load_vae(folder)


def test_extra_key_raises(sd3_vae_folder, tmp_path):
    folder = _copy(sd3_vae_folder, tmp_path / "vae")
    _rewrite(
        folder, lambda t: t.update({"quant_conv.weight": np.zeros((32, 32, 1, 1), np.float32)})
    )
    with pytest.raises(WeightLoadError, match=r"unmapped key\(s\) 'quant_conv\.weight'"):
        load_vae(folder)


def test_misshaped_key_raises(sd3_vae_folder, tmp_path):
    folder = _copy(sd3_vae_folder, tmp_path / "vae")
    key = "encoder.conv_in.weight"
    _rewrite(folder, lambda t: t.update({key: np.zeros((16, 3, 5, 5), np.float32)}))
    with pytest.raises(WeightLoadError) as e:
        load_vae(folder)
    msg = str(e.value)
    assert key in msg and "(16, 3, 5, 5)" in msg and "(16, 3, 3, 3)" in msg
    assert "diffusion_pytorch_model.safetensors" in msg


def test_missing_config_raises(tmp_path):
    with pytest.raises(WeightLoadError, match=r"config\.json"):
        load_vae(tmp_path)


# ------------------------------------------------------------------- full-size SD3 key map


def test_sd3_full_size_key_map_covers_diffusers_exactly():
    """Every tensor of the real-size SD3 VAE (built on torch's meta device) maps, and back."""
    sd3 = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**sd3)
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    assert cfg == VAEConfig.sd3()
    model = abstract_model(lambda rngs: AutoencoderKL(cfg, rngs=rngs))
    source = meta_source(ref)
    params = convert_vae_params(model, source)
    source.assert_all_consumed()
    assert len(params) == len(source)
