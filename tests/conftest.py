"""Shared test configuration: strict JAX numerics, a key factory and the tolerance helper."""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import numpy as np
import pytest
from _torchvision import ensure_importable

jax.config.update("jax_numpy_rank_promotion", "raise")
# diffusers -> transformers -> torchvision must import in every test process, whatever the
# collection order (deepinv's tests used to apply this first by luck): see _torchvision.py
ensure_importable()


@pytest.fixture
def getkey():
    """Return a function that yields a fresh, never-reused PRNG key on every call."""
    counter = itertools.count()
    base = jax.random.key(0)
    return lambda: jax.random.fold_in(base, next(counter))


def rel_max_err(ours, ref) -> float:
    """max |ours - ref| / std(ref): the one tolerance measure the parity tests use."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape mismatch {ours.shape} vs {ref.shape}"
    scale = float(np.std(ref)) or 1.0
    return float(np.max(np.abs(ours - ref)) / scale)


def assert_close_rel(ours, ref, tol: float, what: str = "") -> None:
    err = rel_max_err(ours, ref)
    assert err <= tol, f"{what}: relative max error {err:.3e} > {tol:.1e}"
