"""Our operators against deepinv's physics operators (a test extra; skipped without it).

deepinv is NCHW (torch), rfmpc NHWC (JAX): every comparison transposes at the boundary. Each
check runs on the PnP-Flow preset at 128x128 (the paper's size) and on the embedded model's
32x32, float32 throughout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _deepinv import import_deepinv

from rfmpc.inverse import add_noise, task_preset
from rfmpc.inverse.operators import gaussian_kernel

dinv = import_deepinv()
torch = pytest.importorskip("torch")

SIZES = (32, 128)
ATOL = 2e-6


def _x(size, seed=0, b=2):
    """A batch in [-1, 1], NHWC (numpy float32)."""
    return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", SIZES)
def test_inpainting_box_and_random_match_deepinv(size):
    x = _x(size)
    for task in ("inpaint-box", "inpaint-random"):
        op = task_preset(task, (size, size, 3), jax.random.key(size)).operator
        mask = np.array(op.mask).transpose(2, 0, 1).copy()  # (1, h, w): shared by channels
        phys = dinv.physics.Inpainting(img_size=(3, size, size), mask=torch.from_numpy(mask))
        np.testing.assert_allclose(np.asarray(op(jnp.asarray(x))), _nhwc(phys.A(_nchw(x))))
        np.testing.assert_allclose(
            np.asarray(op.adjoint(jnp.asarray(x))), _nhwc(phys.A_adjoint(_nchw(x)))
        )


def test_deepinv_inpainting_float_mask_keeps_that_fraction():
    """deepinv's ``Inpainting(mask=0.7)`` KEEPS 70% of the pixels: PnP-Flow's 70%-missing task
    is ``mask=0.3`` there and ``missing=0.7`` (task_preset) here."""
    gen = torch.Generator().manual_seed(0)
    phys = dinv.physics.Inpainting(img_size=(3, 128, 128), mask=0.7, rng=gen)
    kept_deepinv = float(phys.mask.float().mean())
    ours = task_preset("inpaint-random", (128, 128, 3), jax.random.key(1)).operator.mask
    kept_ours = float(jnp.mean(ours))
    assert abs(kept_deepinv - 0.7) < 0.015 and abs(kept_ours - 0.3) < 0.015


def test_gaussian_kernel_matches_deepinv():
    """PnP-Flow's 61x61, std-1 kernel; deepinv builds it with ``gaussian_blur(psf_size, sigma)``."""
    for k, s in ((61, 1.0), (31, 1.0), (9, 2.0)):
        theirs = dinv.physics.functional.gaussian_blur(psf_size=(k, k), sigma=(s, s))
        np.testing.assert_allclose(
            gaussian_kernel(k, s), theirs.numpy().reshape(k, k), rtol=1e-5, atol=1e-9
        )


@pytest.mark.parametrize("size", SIZES)
def test_circular_blur_matches_blurfft_and_blur_circular(size):
    p = task_preset("deblur", (size, size, 3))
    k = p.operator.kernel_size
    kern = torch.from_numpy(gaussian_kernel(k, 1.0).astype(np.float32)).reshape(1, 1, k, k)
    x = _x(size, 1)
    ours = np.asarray(p.operator(jnp.asarray(x)))
    ours_adj = np.asarray(p.operator.adjoint(jnp.asarray(x)))
    fft = dinv.physics.BlurFFT(img_size=(3, size, size), filter=kern)
    np.testing.assert_allclose(ours, _nhwc(fft.A(_nchw(x))), atol=ATOL)
    np.testing.assert_allclose(ours_adj, _nhwc(fft.A_adjoint(_nchw(x))), atol=ATOL)
    spatial = dinv.physics.Blur(filter=kern, padding="circular")
    np.testing.assert_allclose(ours, _nhwc(spatial.A(_nchw(x))), atol=ATOL)


@pytest.mark.parametrize("size", SIZES)
def test_decimation_matches_downsampling_without_filter(size):
    op = task_preset("sr2", (size, size, 3)).operator
    phys = dinv.physics.Downsampling(img_size=(3, size, size), filter=None, factor=2)
    x = _x(size, 2)
    y = np.asarray(op(jnp.asarray(x)))
    np.testing.assert_array_equal(y, _nhwc(phys.A(_nchw(x))))
    np.testing.assert_array_equal(
        np.asarray(op.adjoint(jnp.asarray(y))), _nhwc(phys.A_adjoint(_nchw(y)))
    )


def test_denoising_and_gaussian_noise_match_deepinv():
    """Both: ``y = x + sigma n`` on [-1, 1] images (same law, different generators)."""
    sigma = task_preset("denoise", (128, 128, 3)).noise_std
    x = _x(128, 3, b=4)
    op = task_preset("denoise", (128, 128, 3)).operator
    phys = dinv.physics.Denoising(noise_model=dinv.physics.GaussianNoise(sigma=sigma))
    np.testing.assert_array_equal(np.asarray(op(jnp.asarray(x))), _nhwc(phys.A(_nchw(x))))
    torch.manual_seed(0)
    r_deepinv = _nhwc(phys(_nchw(x))) - x
    r_ours = np.asarray(add_noise(jax.random.key(0), jnp.asarray(x), sigma)) - x
    for r in (r_deepinv, r_ours):  # 196608 draws: the std's std is 0.2 / 627
        assert abs(float(r.std()) - sigma) < 2e-3 and abs(float(r.mean())) < 2e-3
