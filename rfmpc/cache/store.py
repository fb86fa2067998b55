"""Cache stores: put a prompt's trajectory states, find the most similar cached prompt, resume.

:class:`AbstractCacheStore` holds the lookup logic every store shares: ``nearest`` asks the
store's similarity index for candidates (same ``model_id`` and ``config_hash`` only), loads them
best first, reports and skips any that is damaged (``warnings.warn`` with :class:`CacheWarning`
and ``store.problems``) and falls back to the next-nearest; ``lookup`` adds the
:class:`~rfmpc.cache.policy.ResumePolicy`'s choice of resume step.

Implementations: :class:`MemoryCacheStore` here (a dict in this process, for tests: entries
still go through the blob serialisation, so a round trip is what disk gives) and
:class:`~rfmpc.cache.disk.DiskCacheStore` (a directory shared by processes).
"""

from __future__ import annotations

import abc
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from rfmpc.cache.entry import (
    CacheEntry,
    CacheEntryError,
    entry_from_tensors,
    entry_to_tensors,
    make_entry,
    new_entry_id,
    payload_nbytes,
)
from rfmpc.cache.index import SimilarityIndex
from rfmpc.cache.policy import ResumePolicy
from rfmpc.flow.state import TrajectoryState

__all__ = [
    "AbstractCacheStore",
    "CacheHit",
    "CacheIndexError",
    "CacheProblem",
    "CacheWarning",
    "EntryInfo",
    "MemoryCacheStore",
    "VerifyReport",
]


class CacheWarning(UserWarning):
    """A cache entry was skipped because its blob is missing or damaged."""


class CacheIndexError(ValueError):
    """The cache's SQLite index is unreadable or of another version."""


@dataclasses.dataclass(frozen=True)
class CacheProblem:
    """A damaged entry: ``kind`` is one of ``missing``, ``truncated``, ``corrupted``,
    ``mismatch`` (blob disagrees with its index row), ``invalid_id``, ``unreadable``,
    ``bad_row`` (the index row itself is malformed)."""

    entry_id: str
    kind: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """What ``ls`` shows about an entry (no blob is read)."""

    entry_id: str
    prompt: str
    model_id: str
    config_hash: str
    steps: tuple[int, ...]
    num_steps: int
    dim: int
    nbytes: int
    created: float
    last_used: float

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["steps"] = list(self.steps)
        return d


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`AbstractCacheStore.verify`; ``clean`` is False if any entry is damaged.

    ``orphans`` are files in the blob directory that no index row owns (left by a crash between
    a blob write and its index commit, or foreign files); they do not make the report unclean.
    """

    checked: int
    ok: tuple[str, ...]
    problems: tuple[CacheProblem, ...]
    orphans: tuple[str, ...] = ()
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "checked": self.checked,
            "ok": len(self.ok),
            "problems": [p.to_dict() for p in self.problems],
            "orphans": list(self.orphans),
            "repaired": self.repaired,
        }


class CacheHit(NamedTuple):
    """A lookup result: resume ``entry.states[step]``; unpacks as ``entry, similarity, step``."""

    entry: CacheEntry
    similarity: float
    step: int

    @property
    def state(self) -> TrajectoryState:
        return self.entry.states[self.step]


class _Vanished(Exception):
    """The entry was removed (evicted, cleared) by someone else between lookup and load."""


def _check_limit(value, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    return int(value)


class AbstractCacheStore(abc.ABC):
    """Common interface and lookup logic of the cache stores.

    Subclasses implement storage (``put``, ``get``, ``ls``, ``verify``, ``clear``, ``__len__``)
    and the hooks ``_candidates``, ``_load``, ``_touch``, ``_forget``. Problems met during
    lookups accumulate in :attr:`problems` (and are warned about with :class:`CacheWarning`).
    """

    def __init__(self, *, clock: Callable[[], float] = time.time):
        self.problems: list[CacheProblem] = []
        self._clock = clock
        self._quarantined: set[str] = set()

    # ------------------------------------------------------------------ storage
    @abc.abstractmethod
    def put(
        self,
        prompt: str,
        pooled,
        states: Mapping[int, TrajectoryState] | Sequence[TrajectoryState],
        *,
        model_id: str,
        config_hash: str,
        extras: Mapping[str, Any] | None = None,
    ) -> str:
        """Cache ``states`` (dict step -> state, or a list) of one run of ``prompt``.

        ``pooled`` is the prompt's pooled embedding, ``(d,)`` or ``(1, d)``; ``extras`` are
        named arrays stored with the states (:attr:`CacheEntry.extras`). Returns the new entry
        id. May evict least-recently-used entries to honour the store's limits.
        """

    @abc.abstractmethod
    def get(self, entry_id: str) -> CacheEntry:
        """Load an entry (``KeyError`` if absent, ``CacheEntryError`` if damaged)."""

    @abc.abstractmethod
    def ls(self) -> list[EntryInfo]:
        """All entries, most recently used first."""

    @abc.abstractmethod
    def verify(self, *, repair: bool = False) -> VerifyReport:
        """Check every entry; with ``repair=True`` drop damaged entries and orphan files."""

    @abc.abstractmethod
    def clear(self) -> int:
        """Remove every entry; returns how many were removed."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _ids_with_prompt(self, prompt: str, model_id: str, config_hash: str) -> list[str]:
        """Ids of the entries that cache exactly ``prompt`` under this model and config."""

    @abc.abstractmethod
    def _candidates(
        self, q: np.ndarray, model_id: str, config_hash: str, k: int, floor, exclude: set[str]
    ) -> list[tuple[str, float]]: ...

    @abc.abstractmethod
    def _load(self, entry_id: str) -> CacheEntry:
        """Load and verify; raise ``CacheEntryError`` (with ``.kind``) or ``_Vanished``."""

    @abc.abstractmethod
    def _touch(self, entry_id: str, when: float) -> None: ...

    @abc.abstractmethod
    def _forget(self, entry_id: str) -> None:
        """Drop ``entry_id`` from the in-memory similarity index (not from storage)."""

    # ------------------------------------------------------------------ lookups
    def _report(self, entry_id: str, err: CacheEntryError) -> None:
        problem = CacheProblem(str(entry_id), getattr(err, "kind", "corrupted"), str(err))
        self.problems.append(problem)
        self._quarantined.add(str(entry_id))
        self._forget(str(entry_id))
        warnings.warn(
            f"rfmpc cache: skipping entry {entry_id!r} ({problem.kind}): {problem.message}; "
            "run `rfmpc cache verify --repair` to remove it",
            CacheWarning,
            stacklevel=3,
        )

    def nearest(
        self,
        pooled,
        *,
        model_id: str,
        config_hash: str,
        min_similarity: float | None = None,
    ) -> tuple[CacheEntry, float] | None:
        """The most cosine-similar compatible entry that loads intact: ``(entry, similarity)``.

        Only entries with equal ``model_id`` and ``config_hash`` are considered; entries below
        ``min_similarity`` are ignored. A damaged entry is reported and skipped in favour of the
        next-nearest. Marks the returned entry as used (LRU). None if nothing qualifies.
        """
        if not isinstance(model_id, str) or not isinstance(config_hash, str):
            raise TypeError("model_id and config_hash must be str")
        q = np.asarray(pooled, dtype=np.float32)
        tried: set[str] = set()
        while True:
            cands = self._candidates(q, model_id, config_hash, 4, min_similarity, tried)
            if not cands:
                return None
            for eid, sim in cands:
                tried.add(eid)
                try:
                    entry = self._load(eid)
                except _Vanished:
                    self._forget(eid)
                    continue
                except CacheEntryError as e:
                    self._report(eid, e)
                    continue
                now = float(self._clock())
                self._touch(eid, now)
                return dataclasses.replace(entry, last_used=now), sim

    def find_prompt(self, prompt: str, *, model_id: str, config_hash: str) -> list[CacheEntry]:
        """Every intact entry that caches exactly ``prompt`` (newest first); damaged ones are
        reported and skipped like in :meth:`nearest`. Does not touch the LRU order."""
        if not isinstance(model_id, str) or not isinstance(config_hash, str):
            raise TypeError("model_id and config_hash must be str")
        out = []
        for eid in self._ids_with_prompt(str(prompt), model_id, config_hash):
            if eid in self._quarantined:
                continue
            try:
                out.append(self._load(eid))
            except _Vanished:
                continue
            except CacheEntryError as e:
                self._report(eid, e)
        return sorted(out, key=lambda e: -e.created)

    def touch(self, entry_id: str) -> None:
        """Mark an entry as used now (LRU), e.g. when it served an exact repeat."""
        self._touch(entry_id, float(self._clock()))

    def lookup(
        self,
        pooled,
        num_steps: int,
        policy: ResumePolicy | None = None,
        *,
        model_id: str,
        config_hash: str,
    ) -> CacheHit | None:
        """Find the nearest compatible entry and the step to resume from under ``policy``.

        Returns ``CacheHit(entry, similarity, step)`` (resume ``hit.state``), or None when no
        entry is similar enough or none caches a usable step: generate from scratch then.
        """
        policy = ResumePolicy() if policy is None else policy
        if not isinstance(policy, ResumePolicy):
            raise TypeError(f"policy must be a ResumePolicy, got {type(policy).__name__}")
        found = self.nearest(
            pooled,
            model_id=model_id,
            config_hash=config_hash,
            min_similarity=policy.min_similarity,
        )
        if found is None:
            return None
        entry, sim = found
        if entry.num_steps != num_steps:
            raise ValueError(
                f"entry {entry.entry_id} was cached on a {entry.num_steps}-step grid but "
                f"num_steps={num_steps}: include the schedule (num_steps, shift) in config_hash"
            )
        step = policy.choose_step(sim, num_steps, entry.steps)
        return None if step is None else CacheHit(entry, sim, step)

    def __contains__(self, entry_id: object) -> bool:
        return any(info.entry_id == entry_id for info in self.ls())

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.ls())


def _new_entry(prompt, pooled, states, model_id, config_hash, now, extras=None) -> CacheEntry:
    return make_entry(
        new_entry_id(),
        prompt,
        pooled,
        states,
        model_id=model_id,
        config_hash=config_hash,
        created=now,
        extras=extras,
    )


def _info(entry: CacheEntry, nbytes: int) -> EntryInfo:
    return EntryInfo(
        entry_id=entry.entry_id,
        prompt=entry.prompt,
        model_id=entry.model_id,
        config_hash=entry.config_hash,
        steps=entry.steps,
        num_steps=entry.num_steps,
        dim=int(entry.pooled.shape[0]),
        nbytes=nbytes,
        created=entry.created,
        last_used=entry.last_used,
    )


def _lru_victims(
    rows: Sequence[tuple[str, int]], count: int, total: int, max_entries, max_bytes
) -> list[str]:
    """Ids to evict from ``rows`` (id, nbytes), oldest first, until within both limits."""
    victims = []
    for eid, nb in rows:
        if (max_entries is None or count <= max_entries) and (
            max_bytes is None or total <= max_bytes
        ):
            break
        victims.append(eid)
        count -= 1
        total -= nb
    return victims


class MemoryCacheStore(AbstractCacheStore):
    """An in-process cache (for tests); same semantics as :class:`DiskCacheStore`.

    Entries are kept serialised (``entry_to_tensors``) and decoded on load, so a round trip
    through this store is exactly a round trip through a blob.
    """

    def __init__(
        self,
        *,
        max_bytes: int | None = None,
        max_entries: int | None = None,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(clock=clock)
        self.max_bytes = _check_limit(max_bytes, "max_bytes")
        self.max_entries = _check_limit(max_entries, "max_entries")
        self._blobs: dict[str, tuple[dict[str, np.ndarray], dict[str, str]]] = {}
        self._infos: dict[str, EntryInfo] = {}
        self._index = SimilarityIndex()

    def put(self, prompt, pooled, states, *, model_id, config_hash, extras=None) -> str:
        now = float(self._clock())
        entry = _new_entry(prompt, pooled, states, model_id, config_hash, now, extras)
        tensors, metadata = entry_to_tensors(entry)
        nbytes = payload_nbytes(tensors, metadata)
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise ValueError(f"entry of {nbytes} bytes exceeds max_bytes={self.max_bytes}")
        eid = entry.entry_id
        self._blobs[eid] = (tensors, metadata)
        self._infos[eid] = _info(entry, nbytes)
        self._index.add(eid, entry.pooled, model_id=model_id, config_hash=config_hash)
        self._evict(keep=eid)
        return eid

    def _evict(self, keep: str) -> None:
        rows = sorted(
            (i for i in self._infos.values() if i.entry_id != keep),
            key=lambda i: (i.last_used, i.created),
        )
        total = sum(i.nbytes for i in self._infos.values())
        victims = _lru_victims(
            [(i.entry_id, i.nbytes) for i in rows],
            len(self._infos),
            total,
            self.max_entries,
            self.max_bytes,
        )
        for eid in victims:
            self._remove(eid)

    def _remove(self, eid: str) -> None:
        self._blobs.pop(eid, None)
        self._infos.pop(eid, None)
        self._index.remove(eid)
        self._quarantined.discard(eid)

    def _load(self, entry_id: str) -> CacheEntry:
        if entry_id not in self._blobs:
            raise _Vanished(entry_id)
        tensors, metadata = self._blobs[entry_id]
        info = self._infos[entry_id]
        entry = entry_from_tensors(
            tensors,
            metadata,
            source=f"memory:{entry_id}",
            last_used=info.last_used,
            nbytes=info.nbytes,
        )
        if entry.entry_id != entry_id:
            err = CacheEntryError(f"memory:{entry_id}: blob holds entry {entry.entry_id}")
            err.kind = "mismatch"
            raise err
        return entry

    def get(self, entry_id: str) -> CacheEntry:
        if entry_id not in self._blobs:
            raise KeyError(f"no cache entry {entry_id!r}")
        return self._load(entry_id)

    def _ids_with_prompt(self, prompt, model_id, config_hash):
        return [
            eid
            for eid, i in self._infos.items()
            if (i.prompt, i.model_id, i.config_hash) == (prompt, model_id, config_hash)
        ]

    def _candidates(self, q, model_id, config_hash, k, floor, exclude):
        return self._index.nearest(
            q,
            model_id=model_id,
            config_hash=config_hash,
            k=k,
            min_similarity=floor,
            exclude=exclude | self._quarantined,
        )

    def _touch(self, entry_id: str, when: float) -> None:
        info = self._infos.get(entry_id)
        if info is not None and when > info.last_used:
            self._infos[entry_id] = dataclasses.replace(info, last_used=when)

    def _forget(self, entry_id: str) -> None:
        self._index.remove(entry_id)

    def ls(self) -> list[EntryInfo]:
        return sorted(self._infos.values(), key=lambda i: (-i.last_used, -i.created))

    def verify(self, *, repair: bool = False) -> VerifyReport:
        ok, problems = [], []
        for eid in list(self._blobs):
            try:
                self._load(eid)
                ok.append(eid)
            except CacheEntryError as e:
                problems.append(CacheProblem(eid, getattr(e, "kind", "corrupted"), str(e)))
        if repair:
            for p in problems:
                self._remove(p.entry_id)
        return VerifyReport(len(ok) + len(problems), tuple(ok), tuple(problems), (), repair)

    def clear(self) -> int:
        n = len(self._blobs)
        self._blobs.clear()
        self._infos.clear()
        self._index.clear()
        self._quarantined.clear()
        return n

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._blobs
