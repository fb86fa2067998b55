"""PnP-Flow's image tasks (``task_preset``): the published settings at 128x128, their scaling to
the embedded model's 32x32, the decimation operator, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.inverse import (
    PNP_FLOW_TASKS,
    Decimation,
    GaussianBlur,
    Identity,
    Inpainting,
    task_preset,
)


def _randn(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("size", [32, 128])
@pytest.mark.parametrize("task", PNP_FLOW_TASKS)
def test_presets_are_linear_with_exact_adjoints(task, size):
    p = task_preset(task, (size, size, 3), jax.random.key(0))
    x = _randn(1, (2, size, size, 3))
    ax = p.operator(x)
    y = _randn(2, ax.shape)
    lhs, rhs = float(jnp.vdot(ax, y)), float(jnp.vdot(x, p.operator.adjoint(y)))
    assert abs(lhs - rhs) <= 1e-5 * float(jnp.linalg.norm(ax) * jnp.linalg.norm(y))
    assert p.task == task and "PnP-Flow" in p.reference


def test_noise_levels_are_pnp_flows():
    noise = {t: task_preset(t, (32, 32, 3), jax.random.key(0)).noise_std for t in PNP_FLOW_TASKS}
    assert noise == {
        "denoise": 0.2,
        "deblur": 0.05,
        "sr2": 0.05,
        "inpaint-random": 0.01,
        "inpaint-box": 0.05,
    }
    assert isinstance(task_preset("denoise", (32, 32)).operator, Identity)


def test_box_is_pnp_flows_centred_square_scaled():
    """128: PnP-Flow's mask[d - 20 : d + 20] with d = 64 (a 40x40 box); 32: half-size 5."""
    for size, lo, hi in ((128, 44, 84), (32, 11, 21), (64, 22, 42)):
        p = task_preset("inpaint-box", (size, size, 3))
        assert isinstance(p.operator, Inpainting)
        want = np.ones((size, size, 1), np.float32)
        want[lo:hi, lo:hi] = 0.0
        np.testing.assert_array_equal(np.asarray(p.operator.mask), want)
    # non-square images scale each axis
    p = task_preset("inpaint-box", (32, 64, 3))
    assert p.params["box"] == [11, 22, 10, 20]


def test_deblur_keeps_one_pixel_std_and_clips_the_support():
    p128 = task_preset("deblur", (128, 128, 3))
    p32 = task_preset("deblur", (32, 32, 3))
    assert isinstance(p128.operator, GaussianBlur)
    assert (p128.operator.kernel_size, p128.operator.blur_sigma) == (61, 1.0)
    assert (p32.operator.kernel_size, p32.operator.blur_sigma) == (31, 1.0)
    # clipping 61 -> 31 taps on a 32-periodic grid changes nothing measurable at std 1 px
    wide = GaussianBlur((32, 32), 61, 1.0)
    np.testing.assert_allclose(
        np.asarray(p32.operator.transfer), np.asarray(wide.transfer), atol=1e-6
    )
    # and it really blurs: the impulse response's centre tap is 1 / (2 pi) normalised
    x = jnp.zeros((1, 32, 32, 1)).at[0, 16, 16, 0].set(1.0)
    assert 0.15 < float(p32.operator(x)[0, 16, 16, 0]) < 0.17


def test_decimation_keeps_the_top_left_pixel_and_its_adjoint_zero_fills():
    x = _randn(3, (2, 8, 6, 3))
    op = task_preset("sr2", (8, 6, 3)).operator
    assert isinstance(op, Decimation)
    np.testing.assert_array_equal(np.asarray(op(x)), np.asarray(x)[:, ::2, ::2])
    y = _randn(4, (2, 4, 3, 3))
    up = np.asarray(op.adjoint(y))
    np.testing.assert_array_equal(up[:, ::2, ::2], np.asarray(y))
    assert np.count_nonzero(up) == np.count_nonzero(np.asarray(y))
    np.testing.assert_array_equal(np.asarray(op(op.adjoint(y))), np.asarray(y))  # A A^T = I
    assert op.input_shape(y.shape) == (2, 8, 6, 3)
    assert op.display(y).shape == (2, 8, 6, 3)


def test_random_mask_misses_seventy_percent():
    p = task_preset("inpaint-random", (128, 128, 3), jax.random.key(7))
    m = np.asarray(p.operator.mask)
    assert m.shape == (128, 128, 1)
    assert abs((m == 0).mean() - 0.7) < 0.01  # 16384 pixels: std 0.0036


def test_preset_errors_name_the_fix():
    with pytest.raises(
        ValueError, match=r"unknown PnP-Flow task 'sr4'; choose one of .*make_operator"
    ):
        task_preset("sr4", (32, 32, 3))
    with pytest.raises(ValueError, match="needs key="):
        task_preset("inpaint-random", (32, 32, 3))
    with pytest.raises(ValueError, match="sr2 needs an even image size, got 31x32"):
        task_preset("sr2", (31, 32, 3))
    with pytest.raises(ValueError, match=r"image_shape must be \(h, w\) or \(h, w, c\)"):
        task_preset("denoise", (1, 32, 32, 3))
    with pytest.raises(ValueError, match="SR factor 2"):
        Decimation(2)(jnp.zeros((1, 5, 4, 3)))
    with pytest.raises(ValueError, match="factor must be a positive int"):
        Decimation(0)
