"""Forward operators ``y = A(x) + n`` of the image-restoration benchmarks, batched and jit-able.

Every operator acts on a batch of NHWC images ``x`` of shape ``(b, h, w, c)`` (values in the
model's ``[-1, 1]`` range; for latent models the solver decodes first, so operators always see
images) and returns the measurement batch. Linear operators also have an exact :meth:`adjoint`
(``<A x, y> = <x, A^T y>``, checked by the dot-product test in ``tests/``) and a dense matrix on
small inputs (:meth:`AbstractOperator.as_matrix`), which the Gaussian-mixture oracle uses.

=====================  =====================================================================
operator               definition
=====================  =====================================================================
:class:`Inpainting`    ``y = m * x`` with a fixed binary mask ``m`` of shape ``(h, w, 1)``
                       (shared by channels); :func:`box_inpainting` (a centred box missing)
                       and :func:`random_inpainting` (each pixel missing with probability
                       ``missing``, from an explicit key).
:class:`GaussianBlur`  circular convolution with a normalised ``k x k`` Gaussian kernel of
                       std ``blur_sigma`` pixels, computed by FFT (so the boundary is
                       *periodic*: light leaving the right edge re-enters on the left).
:class:`AveragePool`   super-resolution: ``f x f`` average pooling (``h``, ``w`` divisible
                       by ``f``); the adjoint is nearest upsampling divided by ``f**2``.
:class:`Decimation`    super-resolution as PnP-Flow poses it: keep the top-left pixel of each
                       ``f x f`` block, ``y = x[:, ::f, ::f]`` (no anti-aliasing filter); the
                       adjoint puts ``y`` back on the kept pixels and zeros elsewhere.
:class:`Identity`      denoising.
:class:`SaturatedBlur` the non-linear blur ``y = tanh(g * B x) / tanh(g)``: the Gaussian blur
                       followed by a smooth saturation of gain ``g`` (maps ``[-1, 1]`` onto
                       itself, differentiable, strictly monotone, so invertible in principle
                       but ill-conditioned near saturation).
:class:`MatrixOperator` a dense matrix acting on each flattened sample (tests, analytic priors).
=====================  =====================================================================

:func:`add_noise` draws ``y = A(x) + noise_std * N(0, I)``; :func:`make_operator` builds the
operator of a benchmark task by name (:data:`TASKS`) with this project's original settings;
:func:`task_preset` builds the tasks of :data:`PNP_FLOW_TASKS` at PnP-Flow's conventions
(Martin et al., ICLR 2025, CelebA 128x128), scaled to the image size (``docs/mpcflow.md``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = [
    "PNP_FLOW_TASKS",
    "TASKS",
    "AbstractOperator",
    "AveragePool",
    "Decimation",
    "GaussianBlur",
    "Identity",
    "Inpainting",
    "MatrixOperator",
    "SaturatedBlur",
    "TaskPreset",
    "add_noise",
    "box_inpainting",
    "gaussian_kernel",
    "make_operator",
    "random_inpainting",
    "task_preset",
]

#: Benchmark task names (the CLI's ``--task``).
TASKS = ("inpaint-box", "inpaint-random", "deblur", "sr2", "sr4", "denoise", "nonlinear-deblur")


def _check_nhwc(x, name: str = "x"):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(
            f"{name} must be a batch of NHWC images of shape (b, h, w, c), got shape "
            f"{getattr(x, 'shape', type(x).__name__)}; add a batch axis with x[None]"
        )


class AbstractOperator(eqx.Module):
    """A forward operator on NHWC image batches.

    Subclasses implement :meth:`__call__` and, if linear, :meth:`adjoint`; ``is_linear`` is a
    class attribute. :meth:`input_shape` maps a measurement shape back to the image shape.
    """

    is_linear: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def __call__(self, x: Float[Array, "b h w c"]) -> Array:
        """The noiseless measurement ``A(x)``."""

    def adjoint(self, y: Array) -> Float[Array, "b h w c"]:
        """``A^T y`` (linear operators only)."""
        raise TypeError(
            f"{type(self).__name__} is not linear and has no adjoint; use jax.vjp for gradients"
        )

    def input_shape(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The image batch shape whose measurement has shape ``y_shape`` (default: the same)."""
        return tuple(y_shape)

    def display(self, y: Array) -> Float[Array, "b h w c"]:
        """An image-shaped view of a measurement, for figures (default: ``y`` itself)."""
        return y

    def as_matrix(self, shape: tuple[int, ...]) -> Float[Array, "m d"]:
        """The dense matrix ``(m, d)`` of a linear operator on one image of ``shape = (h, w, c)``.

        Built with ``jax.jacfwd`` on the flattened image, so it is exact (no finite
        differences); only sensible for small ``d = h * w * c``.
        """
        if not self.is_linear:
            raise TypeError(f"{type(self).__name__} is not linear: it has no matrix")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise ValueError(f"shape must be one image's (h, w, c), got {shape}")
        d = math.prod(shape)
        f = lambda v: self(v.reshape(1, *shape)).reshape(-1)
        return jax.jacfwd(f)(jnp.zeros((d,), jnp.float32))


# ------------------------------------------------------------------------------ inpainting


class Inpainting(AbstractOperator):
    """``y = mask * x``: pixels where ``mask == 0`` are missing (their ``y`` is pure noise).

    ``mask`` has shape ``(h, w, 1)`` (shared by channels) or ``(h, w, c)``; it is applied to
    every image of the batch. ``y`` keeps the image shape, so the adjoint is the same masking.
    """

    mask: Float[Array, "h w cm"]
    is_linear: ClassVar[bool] = True

    def __init__(self, mask):
        mask = jnp.asarray(mask, jnp.float32)
        if mask.ndim != 3:
            raise ValueError(f"mask must have shape (h, w, 1) or (h, w, c), got {mask.shape}")
        self.mask = mask

    def _check(self, x, name):
        _check_nhwc(x, name)
        if x.shape[1:3] != self.mask.shape[:2]:
            raise ValueError(
                f"{name} has spatial size {x.shape[1:3]} but the mask is {self.mask.shape[:2]}"
            )

    def __call__(self, x):
        self._check(x, "x")
        return x * self.mask[None].astype(x.dtype)

    def adjoint(self, y):
        self._check(y, "y")
        return y * self.mask[None].astype(y.dtype)


def box_inpainting(
    image_shape: tuple[int, int], box: tuple[int, int, int, int] | None = None
) -> Inpainting:
    """Box inpainting on ``(h, w)`` images: ``box = (top, left, height, width)`` is missing.

    Default: a centred box of half the height and width (a quarter of the pixels missing).
    """
    h, w = (int(s) for s in image_shape[:2])
    if box is None:
        box = (h // 4, w // 4, h // 2, w // 2)
    top, left, bh, bw = (int(b) for b in box)
    if not (0 <= top and 0 <= left and bh > 0 and bw > 0 and top + bh <= h and left + bw <= w):
        raise ValueError(f"box={box} (top, left, height, width) does not fit an image of {h}x{w}")
    m = np.ones((h, w, 1), np.float32)
    m[top : top + bh, left : left + bw] = 0.0
    return Inpainting(m)


def random_inpainting(
    key: PRNGKeyArray, image_shape: tuple[int, int], missing: float = 0.7
) -> Inpainting:
    """Random inpainting: each pixel (all channels together) is missing with prob. ``missing``."""
    if not 0.0 <= missing < 1.0:
        raise ValueError(f"missing must be in [0, 1), got {missing}")
    h, w = (int(s) for s in image_shape[:2])
    keep = jax.random.uniform(key, (h, w, 1)) >= missing
    return Inpainting(keep.astype(jnp.float32))


# ------------------------------------------------------------------------------ blur


def gaussian_kernel(kernel_size: int, blur_sigma: float) -> np.ndarray:
    """A normalised ``k x k`` Gaussian kernel (``k`` odd) of std ``blur_sigma`` pixels (float64)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, (int, np.integer)):
        raise TypeError(f"kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if not blur_sigma > 0:
        raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
    r = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    g = np.exp(-0.5 * (r / blur_sigma) ** 2)
    k2 = np.outer(g, g)
    return k2 / k2.sum()


def _transfer_function(kernel: np.ndarray, h: int, w: int) -> np.ndarray:
    """FFT of the kernel centred at pixel (0, 0) of an ``h x w`` periodic grid.

    Kernel taps are wrapped modulo ``(h, w)``, so a kernel larger than the image is the exact
    periodic convolution too.
    """
    k = np.asarray(kernel, np.float64)
    kh, kw = k.shape
    pad = np.zeros((h, w), np.float64)
    rows = (np.arange(kh) - kh // 2) % h
    cols = (np.arange(kw) - kw // 2) % w
    np.add.at(pad, (rows[:, None], cols[None, :]), k)
    return np.fft.fft2(pad)


class GaussianBlur(AbstractOperator):
    """Gaussian deblurring's forward model: circular (periodic) convolution by FFT.

    ``y = IFFT(H * FFT(x))`` per channel, with ``H`` the transfer function of a centred
    ``kernel_size x kernel_size`` Gaussian of std ``blur_sigma``; the adjoint multiplies by
    ``conj(H)``. The boundary is periodic; the kernel sums to one, so constants are preserved.
    """

    transfer: Array  # complex64 (h, w)
    kernel_size: int = eqx.field(static=True)
    blur_sigma: float = eqx.field(static=True)
    is_linear: ClassVar[bool] = True

    def __init__(self, image_shape: tuple[int, int], kernel_size: int = 9, blur_sigma=2.0):
        h, w = (int(s) for s in image_shape[:2])
        k = gaussian_kernel(kernel_size, blur_sigma)
        self.transfer = np.asarray(_transfer_function(k, h, w), np.complex64)
        self.kernel_size = int(kernel_size)
        self.blur_sigma = float(blur_sigma)

    def _apply(self, x, transfer, name):
        _check_nhwc(x, name)
        if x.shape[1:3] != self.transfer.shape:
            raise ValueError(
                f"{name} has spatial size {x.shape[1:3]}; this blur was built for "
                f"{self.transfer.shape}"
            )
        xf = jnp.fft.fft2(x.astype(jnp.float32), axes=(1, 2))
        out = jnp.fft.ifft2(xf * transfer[None, :, :, None], axes=(1, 2))
        return jnp.real(out).astype(x.dtype)

    def __call__(self, x):
        return self._apply(x, self.transfer, "x")

    def adjoint(self, y):
        return self._apply(y, jnp.conj(self.transfer), "y")


class SaturatedBlur(AbstractOperator):
    """The non-linear blur ``y = tanh(gain * B x) / tanh(gain)`` (``B``: :class:`GaussianBlur`).

    Documented stand-in for the "non-linear deblurring" task: a blur followed by a smooth,
    saturating sensor response. Differentiable everywhere; for ``gain -> 0`` it tends to ``B``.
    Gradients of the data fit go through ``jax.vjp`` (no adjoint).
    """

    blur: GaussianBlur
    gain: float = eqx.field(static=True)
    is_linear: ClassVar[bool] = False

    def __init__(self, blur: GaussianBlur, gain: float = 2.0):
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.blur = blur
        self.gain = float(gain)

    def __call__(self, x):
        return jnp.tanh(self.gain * self.blur(x)) / math.tanh(self.gain)


# ------------------------------------------------------------------------------ SR, identity


class AveragePool(AbstractOperator):
    """Super-resolution's forward model: ``factor x factor`` average pooling.

    ``(b, h, w, c) -> (b, h / f, w / f, c)``; the adjoint is nearest upsampling divided by
    ``f ** 2``.
    """

    factor: int = eqx.field(static=True)
    is_linear: ClassVar[bool] = True

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        self.factor = int(factor)

    def __call__(self, x):
        _check_nhwc(x)
        b, h, w, c = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not divisible by the SR factor {f}")
        return x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))

    def _up(self, y):
        f = self.factor
        return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2)

    def adjoint(self, y):
        _check_nhwc(y, "y")
        return self._up(y) / (self.factor**2)

    def input_shape(self, y_shape):
        b, h, w, c = y_shape
        return (b, h * self.factor, w * self.factor, c)

    def display(self, y):
        return self._up(y)


class Decimation(AbstractOperator):
    """Super-resolution by bare decimation: ``y = x[:, ::f, ::f]`` (the top-left pixel of each
    ``f x f`` block; no low-pass filter, so high frequencies alias).

    ``(b, h, w, c) -> (b, h / f, w / f, c)``. This is PnP-Flow's ``Superresolution(sf)`` and
    deepinv's ``Downsampling(factor=f, filter=None)``. The adjoint is zero-filling upsampling
    (``y`` on the kept pixels, 0 elsewhere), so ``A A^T = I``.
    """

    factor: int = eqx.field(static=True)
    is_linear: ClassVar[bool] = True

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        self.factor = int(factor)

    def __call__(self, x: Float[Array, "b h w c"]) -> Float[Array, "b hl wl c"]:
        _check_nhwc(x)
        h, w, f = x.shape[1], x.shape[2], self.factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not divisible by the SR factor {f}")
        return x[:, ::f, ::f, :]

    def adjoint(self, y: Float[Array, "b hl wl c"]) -> Float[Array, "b h w c"]:
        _check_nhwc(y, "y")
        b, h, w, c = y.shape
        f = self.factor
        z = jnp.zeros((b, h, f, w, f, c), y.dtype).at[:, :, 0, :, 0, :].set(y)
        return z.reshape(b, h * f, w * f, c)

    def input_shape(self, y_shape):
        b, h, w, c = y_shape
        return (b, h * self.factor, w * self.factor, c)

    def display(self, y):
        f = self.factor
        return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2)


class Identity(AbstractOperator):
    """Denoising: ``A = I``."""

    is_linear: ClassVar[bool] = True

    def __call__(self, x):
        _check_nhwc(x)
        return x

    def adjoint(self, y):
        _check_nhwc(y, "y")
        return y


class MatrixOperator(AbstractOperator):
    """A dense matrix ``(m, d)`` acting on each flattened sample: ``(b, ...) -> (b, m)``.

    ``in_shape`` is one sample's shape (``prod(in_shape) == d``); inputs need not be NHWC, so a
    Gaussian-mixture state ``(b, d)`` works with ``in_shape=(d,)``.
    """

    matrix: Float[Array, "m d"]
    in_shape: tuple[int, ...] = eqx.field(static=True)
    is_linear: ClassVar[bool] = True

    def __init__(self, matrix, in_shape: tuple[int, ...] | None = None):
        matrix = jnp.asarray(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"matrix must be 2-D (m, d), got shape {matrix.shape}")
        in_shape = (matrix.shape[1],) if in_shape is None else tuple(int(s) for s in in_shape)
        if math.prod(in_shape) != matrix.shape[1]:
            raise ValueError(f"in_shape={in_shape} has {math.prod(in_shape)} entries, not d")
        self.matrix = matrix
        self.in_shape = in_shape

    def __call__(self, x):
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"x must have shape (b, *{self.in_shape}), got {x.shape}")
        return x.reshape(x.shape[0], -1) @ self.matrix.T.astype(x.dtype)

    def adjoint(self, y):
        if y.ndim != 2 or y.shape[1] != self.matrix.shape[0]:
            raise ValueError(f"y must have shape (b, {self.matrix.shape[0]}), got {y.shape}")
        return (y @ self.matrix.astype(y.dtype)).reshape(y.shape[0], *self.in_shape)

    def input_shape(self, y_shape):
        return (y_shape[0], *self.in_shape)

    def as_matrix(self, shape=None):
        return self.matrix


# ------------------------------------------------------------------------------ noise, tasks


def add_noise(key: PRNGKeyArray, y: Array, noise_std: float) -> Array:
    """``y + noise_std * N(0, I)`` (the benchmarks' measurement noise)."""
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    return y + noise_std * jax.random.normal(key, y.shape, y.dtype)


def make_operator(
    task: str,
    image_shape: tuple[int, int, int],
    key: PRNGKeyArray | None = None,
    *,
    kernel_size: int = 9,
    blur_sigma: float = 2.0,
    missing: float = 0.7,
    gain: float = 2.0,
) -> AbstractOperator:
    """The forward operator of a benchmark task (see :data:`TASKS`) for ``(h, w, c)`` images.

    ``key`` is needed by ``inpaint-random`` only (the mask). Blur defaults: 9x9 kernel,
    std 2 pixels; random inpainting: 70% of pixels missing; non-linear blur gain 2.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    if task == "inpaint-box":
        return box_inpainting((h, w))
    if task == "inpaint-random":
        if key is None:
            raise ValueError("task 'inpaint-random' needs key= for its random mask")
        return random_inpainting(key, (h, w), missing)
    if task == "deblur":
        return GaussianBlur((h, w), kernel_size, blur_sigma)
    if task == "sr2":
        return AveragePool(2)
    if task == "sr4":
        return AveragePool(4)
    if task == "denoise":
        return Identity()
    if task == "nonlinear-deblur":
        return SaturatedBlur(GaussianBlur((h, w), kernel_size, blur_sigma), gain)
    raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")


# ------------------------------------------------------------------------------ PnP-Flow presets

#: The image tasks of PnP-Flow (Martin et al., ICLR 2025) that :func:`task_preset` builds.
PNP_FLOW_TASKS = ("denoise", "deblur", "sr2", "inpaint-random", "inpaint-box")
#: The resolution PnP-Flow's CelebA conventions are stated at.
PNP_FLOW_RESOLUTION = 128


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """A task at a stated convention: the operator, the noise std and where they come from.

    ``noise_std`` is in model units (images in ``[-1, 1]``, as PnP-Flow's CelebA images after
    ``Normalize(0.5, 0.5)``); ``params`` lists the operator's parameters at this image size
    (JSON-ready); ``reference`` states the published setting they were scaled from.
    """

    task: str
    operator: AbstractOperator
    noise_std: float
    params: dict
    reference: str


def _odd_at_most(n: int) -> int:
    return n if n % 2 else n - 1


def task_preset(
    task: str, image_shape: tuple[int, ...], key: PRNGKeyArray | None = None
) -> TaskPreset:
    """The PnP-Flow task ``task`` (one of :data:`PNP_FLOW_TASKS`) on ``(h, w[, c])`` images.

    PnP-Flow's CelebA 128x128 settings (Gaussian noise of std ``s`` on ``[-1, 1]`` images,
    ``y = A x + s n``) and how they are scaled to ``h x w`` (``r = h / 128``):

    - ``denoise``: ``A = I``, ``s = 0.2``.
    - ``deblur``: circular (FFT) convolution with a normalised Gaussian of std 1.0 pixel on a
      61x61 support, ``s = 0.05``. The std stays 1.0 *pixel* (scaled by ``r`` it would be 0.25
      px at 32x32, where the kernel's centre tap is 0.9987: no blur at all); the support is
      clipped to the largest odd size within the image (taps beyond 5 std are below 4e-6).
    - ``sr2``: decimation by 2, ``y = x[::2, ::2]`` (PnP-Flow's ``Superresolution`` with
      ``mode=None``; no anti-aliasing filter), ``s = 0.05``. The factor stays 2.
    - ``inpaint-random``: each pixel (all channels) missing with probability 0.7, ``s = 0.01``;
      needs ``key`` for the mask (PnP-Flow uses NumPy seed 42; the mask differs, its law not).
    - ``inpaint-box``: a centred square of half-size ``round(20 r)`` missing (rows and columns
      ``h//2 - hs`` to ``h//2 + hs - 1``; 40x40 at 128, 10x10 at 32), ``s = 0.05``.
    """
    if task not in PNP_FLOW_TASKS:
        raise ValueError(
            f"unknown PnP-Flow task {task!r}; choose one of {list(PNP_FLOW_TASKS)} "
            "(other tasks: make_operator)"
        )
    if len(image_shape) not in (2, 3):
        raise ValueError(f"image_shape must be (h, w) or (h, w, c), got {tuple(image_shape)}")
    h, w = int(image_shape[0]), int(image_shape[1])
    if h < 2 or w < 2:
        raise ValueError(f"image_shape {tuple(image_shape)} is too small for PnP-Flow tasks")
    ref = "PnP-Flow (Martin et al., ICLR 2025), CelebA 128x128"
    if task == "denoise":
        return TaskPreset(task, Identity(), 0.2, {}, f"{ref}: Gaussian denoising, sigma 0.2")
    if task == "deblur":
        k = min(61, _odd_at_most(min(h, w)))
        op = GaussianBlur((h, w), k, 1.0)
        return TaskPreset(
            task,
            op,
            0.05,
            {"blur_sigma_px": 1.0, "kernel_size": k, "boundary": "circular"},
            f"{ref}: Gaussian blur std 1.0 px, 61x61, FFT (circular), sigma 0.05",
        )
    if task == "sr2":
        if h % 2 or w % 2:
            raise ValueError(f"sr2 needs an even image size, got {h}x{w}")
        return TaskPreset(
            task,
            Decimation(2),
            0.05,
            {"factor": 2, "filter": None},
            f"{ref}: SR x2 by decimation x[::2, ::2], sigma 0.05",
        )
    if task == "inpaint-random":
        if key is None:
            raise ValueError("task 'inpaint-random' needs key= for its random mask")
        return TaskPreset(
            task,
            random_inpainting(key, (h, w), 0.7),
            0.01,
            {"missing": 0.7},
            f"{ref}: random inpainting, 70% of pixels missing, sigma 0.01",
        )
    hs_h = max(1, round(20 * h / PNP_FLOW_RESOLUTION))
    hs_w = max(1, round(20 * w / PNP_FLOW_RESOLUTION))
    box = (h // 2 - hs_h, w // 2 - hs_w, 2 * hs_h, 2 * hs_w)
    return TaskPreset(
        task,
        box_inpainting((h, w), box),
        0.05,
        {"box": list(box), "half_size": [hs_h, hs_w]},
        f"{ref}: centred 40x40 box (half-size 20), sigma 0.05",
    )
