"""Cross-prompt trajectory cache: entries, the similarity index, the resume policy, the stores.

A prompt's run is cached as ``TrajectoryState`` snapshots at chosen steps; a new prompt looks up
the most similar cached prompt (cosine similarity of pooled embeddings, same model and config
only) and, if similar enough, resumes from the step the :class:`ResumePolicy` picks.
"""

from rfmpc.cache.disk import DiskCacheStore
from rfmpc.cache.entry import (
    CacheEntry,
    CacheEntryError,
    config_hash,
    entry_from_tensors,
    entry_to_tensors,
    validate_entry_id,
)
from rfmpc.cache.index import SimilarityIndex
from rfmpc.cache.policy import ResumePolicy
from rfmpc.cache.store import (
    AbstractCacheStore,
    CacheHit,
    CacheIndexError,
    CacheProblem,
    CacheWarning,
    EntryInfo,
    MemoryCacheStore,
    VerifyReport,
)

__all__ = [
    "AbstractCacheStore",
    "CacheEntry",
    "CacheEntryError",
    "CacheHit",
    "CacheIndexError",
    "CacheProblem",
    "CacheWarning",
    "DiskCacheStore",
    "EntryInfo",
    "MemoryCacheStore",
    "ResumePolicy",
    "SimilarityIndex",
    "VerifyReport",
    "config_hash",
    "entry_from_tensors",
    "entry_to_tensors",
    "validate_entry_id",
]
