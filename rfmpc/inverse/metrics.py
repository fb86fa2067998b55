"""Restoration metrics: PSNR, SSIM, wall time and peak memory.

Images are compared on ``[0, 1]`` (``data_range = 1``); :func:`to_unit` maps the model's
``[-1, 1]`` NHWC images there (clipping). :func:`ssim` is a batched JAX port of scikit-image's
``structural_similarity`` defaults (7x7 uniform window, sample covariance, ``K1 = 0.01``,
``K2 = 0.03``, mean over the interior and then over channels); ``tests/test_inverse_metrics.py``
checks it against scikit-image. LPIPS is not provided: it needs pretrained network weights that
cannot be obtained offline here, and a randomly initialised substitute would not be LPIPS.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = [
    "bootstrap_ci",
    "forward_equivalents",
    "peak_memory",
    "psnr",
    "ssim",
    "ssim_skimage",
    "timed",
    "to_unit",
]


def to_unit(x: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
    """``[-1, 1]`` model images to ``[0, 1]``, clipped."""
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
    """Per-image PSNR in dB, ``10 log10(data_range^2 / MSE)`` (inf for identical images)."""
    x, ref = _check_pair(x, ref)
    mse = jnp.mean((x - ref) ** 2, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


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


def ssim_skimage(x, ref, data_range: float = 1.0) -> np.ndarray:
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


def timed(fn: Callable[..., Any], *args, warmup: bool = True, **kwargs) -> tuple[Any, float, float]:
    """Run ``fn(*args, **kwargs)``, blocking on its arrays; ``(out, run_s, compile_s)``.

    With ``warmup`` the first call (compilation + run) is timed separately as ``compile_s`` and
    the returned ``out``/``run_s`` come from a second call with the same arguments.
    """
    compile_s = 0.0
    if warmup:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0, compile_s


def bootstrap_ci(
    values, level: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of per-image ``values`` and its percentile-bootstrap CI.

    Resamples the images with replacement ``n_boot`` times (NumPy generator of ``seed``, so the
    interval is reproducible) and takes the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the resampled means. Needs at least 2 finite values.
    """
    v = np.asarray(values, np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"bootstrap_ci needs at least 2 values, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError("bootstrap_ci got non-finite values (an identical image has PSNR inf)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(v.mean()), float(lo), float(hi)


def forward_equivalents(nfe, backprops, vjp_ratio: float) -> float:
    """Cost in forward passes: ``nfe + (vjp_ratio - 1) * backprops``.

    ``vjp_ratio`` is the measured time of one VJP through the model *including its forward*
    relative to one forward (``benchmarks/switch_quality.py``'s ``measure_ratios``). Every
    backprop a solver counts follows a forward it also counts in ``nfe``, so a backprop adds
    ``vjp_ratio - 1`` forwards; checkpointed recomputation is inside the measured VJP.
    """
    if not vjp_ratio >= 1.0:
        raise ValueError(f"vjp_ratio must be >= 1 (a VJP includes its forward), got {vjp_ratio}")
    if backprops > nfe:
        raise ValueError(f"backprops ({backprops}) > nfe ({nfe}): each backprop needs a forward")
    return float(nfe) + (float(vjp_ratio) - 1.0) * float(backprops)
