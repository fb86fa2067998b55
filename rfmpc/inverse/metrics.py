"""Restoration evaluation: wall time, bootstrap CIs and forward-pass equivalents.

The image metrics (PSNR, SSIM, ``to_unit``) and ``peak_memory`` live in :mod:`rfmpc.metrics`,
the one implementation the library, the CLI and the benchmarks share; they are re-exported here
under their old names (``rfmpc.inverse.metrics.psnr`` etc. keep working).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from rfmpc.metrics import peak_memory, psnr, ssim, ssim_skimage, to_unit

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
