"""Forward operators: adjoints (dot-product test), dense matrices, exact references, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.inverse import (
    TASKS,
    AveragePool,
    GaussianBlur,
    MatrixOperator,
    SaturatedBlur,
    add_noise,
    box_inpainting,
    make_operator,
    random_inpainting,
)
from rfmpc.inverse.operators import gaussian_kernel

SHAPE = (12, 16, 3)


def _randn(key, shape):
    """Standard normal test data from a key, drawn with numpy (no per-shape JAX compile)."""
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).sum()
    return jnp.asarray(np.random.default_rng(int(seed)).standard_normal(shape), jnp.float32)


LINEAR = [t for t in TASKS if t != "nonlinear-deblur"]


def _op(task):
    return make_operator(task, SHAPE, jax.random.key(3))


@pytest.mark.parametrize("task", LINEAR)
def test_dot_product_adjoint(task, getkey):
    """<A x, y> = <x, A^T y> to float precision, on a batch."""
    op = _op(task)
    x = _randn(getkey(), (3, *SHAPE))
    ax = op(x)
    y = _randn(getkey(), ax.shape)
    lhs = float(jnp.vdot(ax, y))
    rhs = float(jnp.vdot(x, op.adjoint(y)))
    scale = float(jnp.linalg.norm(ax) * jnp.linalg.norm(y))
    assert abs(lhs - rhs) <= 1e-6 * scale, (lhs, rhs)
    assert op.is_linear


@pytest.mark.parametrize("task", LINEAR)
def test_as_matrix_is_the_operator_and_its_transpose_the_adjoint(task, getkey):
    shape = (4, 8, 2)
    op = make_operator(task, shape, jax.random.key(5), kernel_size=3, blur_sigma=0.8)
    A = np.asarray(op.as_matrix(shape))
    x = _randn(getkey(), (1, *shape))
    np.testing.assert_allclose(A @ np.asarray(x).ravel(), np.asarray(op(x)).ravel(), atol=1e-5)
    y = _randn(getkey(), op(x).shape)
    np.testing.assert_allclose(
        A.T @ np.asarray(y).ravel(), np.asarray(op.adjoint(y)).ravel(), atol=1e-5
    )


def test_blur_is_circular_convolution(getkey):
    """FFT blur == direct periodic convolution with the normalised Gaussian kernel (numpy)."""
    k, s = 5, 1.3
    op = GaussianBlur(SHAPE[:2], k, s)
    x = np.asarray(_randn(getkey(), (2, *SHAPE)), np.float64)
    ker = np.asarray(gaussian_kernel(k, s), np.float64)
    assert abs(ker.sum() - 1.0) < 1e-12 and ker[2, 2] == ker.max()
    ref = np.zeros_like(x)
    r = k // 2
    for i in range(k):
        for j in range(k):
            ref += ker[i, j] * np.roll(x, (i - r, j - r), axis=(1, 2))
    np.testing.assert_allclose(np.asarray(op(jnp.asarray(x, jnp.float32))), ref, atol=2e-5)
    # constants pass unchanged; a kernel wider than the image wraps around exactly
    c = jnp.full((1, *SHAPE), 0.37)
    np.testing.assert_allclose(np.asarray(op(c)), 0.37, atol=1e-6)
    wide = GaussianBlur((4, 4), 9, 2.0)
    np.testing.assert_allclose(np.asarray(wide(jnp.ones((1, 4, 4, 1)))), 1.0, atol=1e-6)


def test_average_pool_and_nearest_adjoint(getkey):
    op = AveragePool(4)
    x = _randn(getkey(), (2, 16, 8, 3))
    y = op(x)
    ref = np.asarray(x).reshape(2, 4, 4, 2, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-6)
    up = np.repeat(np.repeat(np.asarray(y), 4, 1), 4, 2) / 16
    np.testing.assert_allclose(np.asarray(op.adjoint(y)), up, atol=1e-7)
    assert op.input_shape(y.shape) == x.shape
    assert op.display(y).shape == x.shape
    with pytest.raises(ValueError, match="not divisible by the SR factor 4"):
        op(jnp.zeros((1, 10, 8, 3)))


def test_inpainting_masks(getkey):
    k = getkey()
    op = random_inpainting(k, (64, 64), missing=0.7)
    missing = 1.0 - float(op.mask.mean())
    assert abs(missing - 0.7) < 0.03  # 4096 pixels: std of the fraction ~0.007
    assert op.mask.shape == (64, 64, 1)
    np.testing.assert_array_equal(random_inpainting(k, (64, 64)).mask, op.mask)  # keyed
    x = _randn(getkey(), (2, 64, 64, 3))
    y = op(x)
    m = np.asarray(op.mask)[None]
    assert float(np.abs(np.asarray(y) * (1 - m)).max()) == 0.0  # missing pixels carry nothing
    np.testing.assert_array_equal(np.asarray(y) * m, np.asarray(x) * m)
    box = box_inpainting((8, 8), (2, 3, 4, 2))
    m = np.ones((8, 8))
    m[2:6, 3:5] = 0
    np.testing.assert_array_equal(np.asarray(box.mask[..., 0]), m)
    assert float(box_inpainting((32, 32)).mask.mean()) == 0.75  # default: centred half box
    with pytest.raises(ValueError, match="does not fit"):
        box_inpainting((8, 8), (6, 0, 4, 4))


def test_nonlinear_blur_definition_and_gradients(getkey):
    blur = GaussianBlur(SHAPE[:2], 5, 1.0)
    op = SaturatedBlur(blur, gain=2.0)
    x = jnp.tanh(_randn(getkey(), (2, *SHAPE)))
    np.testing.assert_allclose(
        np.asarray(op(x)), np.tanh(2.0 * np.asarray(blur(x))) / np.tanh(2.0), atol=1e-6
    )
    assert float(jnp.abs(op(x)).max()) <= 1.0  # saturates into [-1, 1]
    weak = SaturatedBlur(blur, gain=1e-3)
    np.testing.assert_allclose(np.asarray(weak(x)), np.asarray(blur(x)), atol=1e-5)
    assert not op.is_linear
    with pytest.raises(TypeError, match="not linear"):
        op.adjoint(x)
    with pytest.raises(TypeError, match="not linear"):
        op.as_matrix(SHAPE)
    # gradients of the data fit through the operator (vjp) match finite differences
    y = op(jnp.tanh(_randn(getkey(), x.shape)))
    f = lambda z: 0.5 * jnp.sum((op(z) - y) ** 2)
    g = jax.grad(f)(x)
    d = _randn(getkey(), x.shape)
    eps = 1e-2
    fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
    assert abs(float(jnp.vdot(g, d)) - float(fd)) < 2e-3 * abs(float(fd)) + 1e-3


@pytest.mark.parametrize("task", TASKS)
def test_jit_and_batch_consistency(task, getkey):
    """jit gives the same result, and each image of a batch is measured independently."""
    op = _op(task)
    x = _randn(getkey(), (3, *SHAPE))
    y = jax.jit(lambda o, z: o(z))(op, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(op(x)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(op(x[1:2]))[0], np.asarray(y[1]), atol=1e-6)


def test_matrix_operator_and_noise(getkey):
    A = _randn(getkey(), (3, 8))
    op = MatrixOperator(A, (2, 2, 2))
    x = _randn(getkey(), (5, 2, 2, 2))
    np.testing.assert_allclose(np.asarray(op(x)), np.asarray(x.reshape(5, 8) @ A.T), atol=1e-5)
    assert op.input_shape((5, 3)) == (5, 2, 2, 2)
    y = jnp.zeros((20_000,))
    n = add_noise(getkey(), y, 0.3)
    assert abs(float(n.std()) - 0.3) < 0.01
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        add_noise(getkey(), y, -1.0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown task 'blur'"):
        make_operator("blur", SHAPE)
    with pytest.raises(ValueError, match="needs key="):
        make_operator("inpaint-random", SHAPE)
    with pytest.raises(ValueError, match="NHWC"):
        _op("deblur")(jnp.zeros((12, 16, 3)))
    with pytest.raises(ValueError, match="built for"):
        _op("deblur")(jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="positive odd"):
        gaussian_kernel(4, 1.0)
    with pytest.raises(ValueError, match="missing must be in"):
        random_inpainting(jax.random.key(0), (4, 4), 1.0)
    with pytest.raises(ValueError, match="factor must be a positive int"):
        AveragePool(0)
