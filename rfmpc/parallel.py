"""Backwards-compatible home of the multi-device helpers (see :mod:`rfmpc.sharding`).

Everything model-free (meshes, batch and parameter sharding, :func:`gather`,
:class:`BatchShardedField`, :func:`initialize_distributed`) lives in :mod:`rfmpc.sharding` and
is re-exported here; :func:`shard_pipeline` is :meth:`rfmpc.pipeline.Pipeline.shard`, which asks
each component to place itself (:class:`rfmpc.sharding.Shardable`). This module imports no model
and no pipeline.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import Mesh

from rfmpc.sharding import *  # noqa: F403  (re-exports every name of rfmpc.sharding.__all__)
from rfmpc.sharding import MIN_SHARD_SIZE
from rfmpc.sharding import __all__ as _SHARDING_NAMES

__all__ = [*_SHARDING_NAMES, "shard_pipeline"]


def shard_pipeline(pipe: Any, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE) -> Any:
    """``pipe.shard(mesh, min_size=min_size)``: a copy of an :class:`rfmpc.pipeline.Pipeline`
    whose weights live on ``mesh`` (see :meth:`~rfmpc.pipeline.Pipeline.shard`)."""
    shard = getattr(pipe, "shard", None)
    if not callable(shard):
        raise TypeError(f"pipe must be an rfmpc.pipeline.Pipeline, got {type(pipe).__name__}")
    return shard(mesh, min_size=min_size)
