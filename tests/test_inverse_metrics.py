"""Metrics against scikit-image, peak memory, the stand-in prior and the `restore` CLI."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rfmpc.flow import GaussianMixture
from rfmpc.inverse import IsotropicMixtureField, peak_memory, psnr, ssim, ssim_skimage, to_unit


def _pairs(key):
    """Image pairs of several kinds: smooth + noise, unrelated noise, a shifted pattern."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**30)))
    yy, xx = np.mgrid[0:32, 0:24]
    smooth = np.stack([np.sin(xx / 5.0), np.cos(yy / 7.0), np.sin((xx + yy) / 9.0)], -1)
    smooth = (0.5 + 0.4 * smooth)[None].astype(np.float32)
    noisy = np.clip(smooth + 0.1 * rng.standard_normal(smooth.shape), 0, 1).astype(np.float32)
    unrelated = rng.uniform(size=smooth.shape).astype(np.float32)
    shifted = np.roll(smooth, 3, axis=2)
    ref = np.concatenate([smooth, smooth, smooth])
    est = np.concatenate([noisy, unrelated, shifted])
    gray = rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)
    return [(est, ref), (gray[:1], gray[1:])]


def test_psnr_matches_skimage(getkey):
    for est, ref in _pairs(getkey()):
        ours = np.asarray(psnr(est, ref))
        want = [peak_signal_noise_ratio(r, e, data_range=1.0) for e, r in zip(est, ref)]
        np.testing.assert_allclose(ours, want, rtol=1e-5)
    assert np.isinf(float(psnr(ref, ref)[0]))


def test_ssim_matches_skimage(getkey):
    for est, ref in _pairs(getkey()):
        ours = np.asarray(ssim(est, ref))
        want = [
            structural_similarity(e, r, channel_axis=-1, data_range=1.0)
            for e, r in zip(est.astype(np.float64), ref.astype(np.float64))
        ]
        np.testing.assert_allclose(ours, want, atol=2e-5)
        np.testing.assert_allclose(ssim_skimage(est, ref), want, atol=1e-12)
    # sanity: identical images score 1 and SSIM ranks the noisy image above the unrelated one
    s = np.asarray(ssim(ref, ref))
    np.testing.assert_allclose(s, 1.0, atol=1e-6)
    est, ref = _pairs(getkey())[0]
    v = np.asarray(ssim(est, ref))
    assert v[0] > 0.5 > v[1]


def test_ssim_is_jittable_and_validates(getkey):
    est, ref = _pairs(getkey())[0]
    np.testing.assert_allclose(jax.jit(ssim)(est, ref), ssim(est, ref), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ssim(est, ref[:1])
    with pytest.raises(ValueError, match="win_size must be odd"):
        ssim(est[:, :5, :5], ref[:, :5, :5])


def test_to_unit_and_peak_memory():
    x = jnp.array([-2.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 5, 1)
    np.testing.assert_allclose(np.asarray(to_unit(x)).ravel(), [0, 0, 0.5, 1, 1])
    nbytes, source = peak_memory()
    assert nbytes > 1_000_000
    assert source == "process_rss" or source.startswith("device:")


def test_isotropic_mixture_is_the_gmm_velocity(getkey):
    """The stand-in prior's O(KD) velocity equals the flow core's exact GMM with tau^2 I."""
    means = jax.random.normal(getkey(), (5, 2, 3, 1))
    w = jnp.array([0.1, 0.2, 0.3, 0.25, 0.15])
    f = IsotropicMixtureField(means, 0.3, w)
    gm = GaussianMixture(w, means.reshape(5, 6), jnp.broadcast_to(0.09 * jnp.eye(6), (5, 6, 6)))
    sig = jnp.array([0.0, 0.3, 0.8, 1.0])

    @jax.jit  # one compilation instead of one per eager op
    def compute(kx, ks):
        x = 1.5 * jax.random.normal(kx, (4, 2, 3, 1))
        ours = jax.vmap(lambda s: f(x, s))(sig)
        ref = jax.vmap(lambda s: gm.velocity(x.reshape(4, 6), s).reshape(x.shape))(sig)
        xs = f.sample(ks, 4000)
        return ours, ref, jnp.std(xs - means[jnp.argmax(f.responsibilities(xs, 0.0), -1)])

    ours, ref, spread = compute(getkey(), getkey())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5)
    assert abs(float(spread) - 0.3) < 0.02


def test_restore_cli_json_contract(tmp_path, capsys, monkeypatch):
    """`restore` through a real Pipeline (tiny random MM-DiT, adapted by prior_from_pipeline):
    MPC-Flow backpropagates through the network; the JSON has the contract's keys."""
    pytest.importorskip("rfmpc.data")
    pytest.importorskip("rfmpc.pipeline")
    from _models import tiny_mmdit_prior

    import rfmpc.restore
    from rfmpc.cli.restore import add_restore_parser

    # the command line offers trained priors only; hand it the tests' random MM-DiT instead
    tiny = tiny_mmdit_prior()
    monkeypatch.setattr(rfmpc.restore, "provide_prior", lambda name: tiny)

    p = argparse.ArgumentParser()
    add_restore_parser(p.add_subparsers(dest="command"))
    out = tmp_path / "strip.png"
    prompt = "a red circle at the top left on a blue background"
    argv = "restore --task sr4 --method mpc-rhc --prior gmm --seed 3 --json".split()
    args = p.parse_args([*argv, "--prompt", prompt, "--out", str(out)])
    assert args.func(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("task", "method", "psnr_db", "ssim", "wall_s", "nfe", "peak_mem_bytes"):
        assert key in res
    # defaults: N = 20 steps, K = 2, 5 Adam iterations: 19 * (1 + 5) + 1 calls, 19 * 5 backprops
    assert (res["task"], res["method"], res["nfe"], res["backprops"]) == ("sr4", "mpc-rhc", 115, 95)
    assert 5.0 < res["psnr_db"] < 60.0 and -1.0 <= res["ssim"] <= 1.0 and res["wall_s"] > 0
    assert out.stat().st_size > 0
    with pytest.raises(SystemExit):
        p.parse_args("restore --task sr3 --method mpc-k1".split())


def test_restore_mmse_averages_independent_samples():
    """``mmse_samples = m`` costs m single runs and differs from one sample (it averages m)."""
    pytest.importorskip("rfmpc.pipeline")
    from _models import tiny_mmdit_prior

    from rfmpc.restore import restore

    prior = tiny_mmdit_prior()
    one = restore(prior, task="denoise", method="mpc-k1", seed=2)
    avg = restore(prior, task="denoise", method="mpc-k1", seed=2, mmse_samples=3)
    assert (one.record["mmse_samples"], avg.record["mmse_samples"]) == (1, 3)
    assert avg.record["nfe"] == 3 * one.record["nfe"]
    assert avg.record["backprops"] == 3 * one.record["backprops"]
    assert not np.allclose(avg.estimate, one.estimate)
    np.testing.assert_array_equal(avg.truth, one.truth)
