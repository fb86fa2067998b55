"""The priors the benchmarks run on: ``rfmpc.restore.PRIORS`` plus ``tiny-mmdit``.

``tiny-mmdit`` is the tests' random 1-layer MM-DiT in a real Pipeline (``tests/_models.py``):
timing/memory plumbing only, its restorations mean nothing.
"""

from __future__ import annotations

from benchmarks._common import tests_module
from rfmpc.restore import PRIORS as LIBRARY_PRIORS
from rfmpc.restore import provide_prior

__all__ = ["BENCH_PRIORS", "bench_prior"]

BENCH_PRIORS = (*LIBRARY_PRIORS, "tiny-mmdit")


def bench_prior(name: str):
    """The prior called ``name`` (one of :data:`BENCH_PRIORS`)."""
    if name == "tiny-mmdit":
        return tests_module("_models").tiny_mmdit_prior()
    if name not in LIBRARY_PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {list(BENCH_PRIORS)}")
    return provide_prior(name)
