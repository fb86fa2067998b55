"""Fidelity metrics and peak memory: the one implementation the library, CLI and benchmarks use.

Images are compared on ``[0, 1]`` (``data_range = 1``); :func:`to_unit` maps the model's
``[-1, 1]`` NHWC images there (clipping). With ``x`` an estimate, ``r`` its reference, ``n`` the
number of elements compared and ``L`` the data range:

* :func:`psnr` (per image) and :func:`psnr_total` (one figure over the whole array):
  ``PSNR = 10 log10(L^2 / MSE)``, ``MSE = (1/n) sum (x - r)^2``; ``inf`` for identical inputs.
* :func:`ssim`: a batched JAX port of scikit-image's ``structural_similarity`` defaults (7x7
  uniform window, sample covariance, ``K1 = 0.01``, ``K2 = 0.03``): per window
  ``SSIM = (2 mu_x mu_r + C1)(2 s_xr + C2) / ((mu_x^2 + mu_r^2 + C1)(s_x^2 + s_r^2 + C2))`` with
  ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` and the (co)variances scaled by ``w^2 / (w^2 - 1)``; mean
  over the interior windows, then over channels. :func:`ssim_skimage` is scikit-image itself
  (``tests/test_inverse_metrics.py`` checks one against the other).
* :func:`rel_max_err` ``= max |x - r| / std(r)``, :func:`rel_l2_err` ``= ||x - r|| / ||r||``
  and :func:`cosine` ``= <a, b> / (||a|| ||b||)``: the agreement figures of the parity and
  precision benchmarks, in float64 NumPy over every element.

LPIPS is not provided: it needs pretrained network weights that cannot be obtained offline here,
and a randomly initialised substitute would not be LPIPS.

:func:`peak_memory` is the process's peak memory: the accelerator's ``peak_bytes_in_use`` where
the backend reports it, else the peak resident set size (``ru_maxrss``).
"""

from __future__ import annotations

import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

__all__ = [
    "cosine",
    "peak_memory",
    "psnr",
    "psnr_total",
    "rel_l2_err",
    "rel_max_err",
    "ssim",
    "ssim_skimage",
    "to_unit",
]


def to_unit(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """``[-1, 1]`` model images to ``[0, 1]``: ``clip((x + 1) / 2, 0, 1)``."""
    return jnp.clip((jnp.asarray(x) + 1.0) * 0.5, 0.0, 1.0)


def _check_pair(x, ref):
    x, ref = jnp.asarray(x), jnp.asarray(ref)
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(
            f"x and ref must be NHWC batches of the same shape, got {x.shape} and {ref.shape}"
        )
    return x.astype(jnp.float32), ref.astype(jnp.float32)


def psnr(
    x: Float[Array, "b h w c"], ref: Float[Array, "b h w c"], data_range: float = 1.0
) -> Float[Array, " b"]:
    """Per-image PSNR in dB, ``10 log10(data_range^2 / MSE_i)`` with ``MSE_i`` the mean squared
    error of image ``i`` over ``h, w, c`` (float32; ``inf`` for identical images)."""
    x, ref = _check_pair(x, ref)
    mse = jnp.mean((x - ref) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def psnr_total(x: ArrayLike, ref: ArrayLike, data_range: float = 1.0) -> float:
    """One PSNR in dB over every element of ``x`` and ``ref`` (any equal shapes), in float64:
    ``10 log10(data_range^2 / MSE)``, ``MSE`` the mean over all elements; ``inf`` if equal.

    Not the mean of :func:`psnr` over a batch (the log of a mean is not the mean of logs).
    """
    a, b = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x and ref must have one shape, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def _box(a, win):
    """Mean over ``win x win`` windows, 'valid' positions only: (b, h, w, c) -> (b, h-w+1, ...)."""
    s = jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, win, win, 1), (1, 1, 1, 1), "VALID")
    return s / (win * win)


def ssim(
    x: Float[Array, "b h w c"],
    ref: Float[Array, "b h w c"],
    data_range: float = 1.0,
    win_size: int = 7,
) -> Float[Array, " b"]:
    """Per-image mean SSIM, equal to ``skimage.metrics.structural_similarity(x_i, ref_i,
    channel_axis=-1, data_range=data_range)`` (its defaults: uniform window, sample covariance).

    scikit-image filters the whole image and then discards a ``(win_size - 1) // 2`` border;
    the kept values are exactly the 'valid' windows computed here.
    """
    x, ref = _check_pair(x, ref)
    if win_size % 2 == 0 or win_size > min(x.shape[1:3]):
        raise ValueError(f"win_size must be odd and <= the image size, got {win_size}")
    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    ux, uy = _box(x, win_size), _box(ref, win_size)
    vx = cov_norm * (_box(x * x, win_size) - ux * ux)
    vy = cov_norm * (_box(ref * ref, win_size) - uy * uy)
    vxy = cov_norm * (_box(x * ref, win_size) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2)).mean(axis=-1)


def ssim_skimage(
    x: Float[ArrayLike, "b h w c"], ref: Float[ArrayLike, "b h w c"], data_range: float = 1.0
) -> Float[np.ndarray, " b"]:
    """scikit-image's SSIM per image (numpy; the reference :func:`ssim` is tested against)."""
    from skimage.metrics import structural_similarity

    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"x and ref must be NHWC batches of one shape: {x.shape}, {ref.shape}")
    return np.array(
        [
            structural_similarity(a, b, channel_axis=-1, data_range=data_range)
            for a, b in zip(x, ref)
        ]
    )


def rel_max_err(x: ArrayLike, ref: ArrayLike) -> float:
    """``max |x - ref| / std(ref)`` in float64 (``std(ref) = 0`` counts as 1)."""
    a, r = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - r)) / (np.std(r) or 1.0))


def rel_l2_err(x: ArrayLike, ref: ArrayLike) -> float:
    """``||x - ref|| / ||ref||`` over every element, in float64 (``||ref|| = 0`` counts as 1)."""
    a, r = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - r) / (np.linalg.norm(r) or 1.0))


def cosine(a: ArrayLike, b: ArrayLike) -> float:
    """Cosine similarity of the flattened arrays, ``<a, b> / (||a|| ||b||)``, in float64."""
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def peak_memory() -> tuple[int, str]:
    """``(bytes, source)``: the accelerator's peak bytes in use when it reports them
    (``source = "device:<platform>"``), else the process's peak resident set size
    (``source = "process_rss"``, from ``resource.getrusage``; it includes everything the
    process ever held, so it is an upper bound).
    """
    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), f"device:{dev.platform}"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return int(rss * scale), "process_rss"
