"""``DiskCacheStore``: a persistent trajectory cache in a directory shared by processes.

Layout::

    DIR/index.sqlite              SQLite index (WAL): one row per entry (prompt, model id,
                                  config hash, steps, pooled embedding, blob SHA-256 and size,
                                  created / last-used times) + a change log
    DIR/blobs/<id>.safetensors    one blob per entry: its states and pooled embedding
    DIR/.lock                     fcntl.flock'd around every write, eviction and repair

A put writes the blob atomically (temp file, fsync, rename: ``rfmpc.io``), then commits its
index row; the row is the commit point. A crash in between leaves an unindexed blob, which the
next open garbage-collects. Readers never take the lock: each keeps an in-memory
:class:`~rfmpc.cache.index.SimilarityIndex` and replays the change log to follow other
processes' puts and evictions. A blob that is missing, truncated or corrupted (its size,
SHA-256 or inner checksums disagree with the index) is reported and skipped by lookups, and
``verify(repair=True)`` removes its row. Entry ids are 32 hex characters, validated before any
path is built, so an index row cannot make the store read or delete a file elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from rfmpc.cache.entry import (
    CacheEntry,
    CacheEntryError,
    entry_from_tensors,
    entry_to_tensors,
    validate_entry_id,
)
from rfmpc.cache.index import SimilarityIndex
from rfmpc.cache.store import (
    AbstractCacheStore,
    CacheIndexError,
    CacheProblem,
    EntryInfo,
    VerifyReport,
    _check_limit,
    _lru_victims,
    _new_entry,
    _Vanished,
)
from rfmpc.io import SafetensorsReadError, load_safetensors, save_safetensors

__all__ = ["DiskCacheStore"]

_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _not_writable(directory: Path, e: OSError, doing: str) -> PermissionError:
    return PermissionError(
        e.errno,
        f"cache directory {directory} is not writable ({os.strerror(e.errno)}) while {doing}: "
        "the cache keeps its index, lock and entries there; fix its permissions or choose a "
        "writable directory (CLI: --cache DIR); nothing was written",
    )


_SCHEMA_VERSION = "1"
_KEEP_CHANGES = 10_000  # change-log rows kept; a reader further behind rebuilds its index
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    model_id TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    steps TEXT NOT NULL,
    num_steps INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    pooled BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used, created);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    entry_id TEXT
);
"""
_BLOB_SUFFIX = ".safetensors"


def _damaged(kind: str, message: str) -> CacheEntryError:
    err = CacheEntryError(message)
    err.kind = kind
    return err


_OWN_FILES = ("blobs", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm", ".lock")


def _refuse_symlinks(directory: Path) -> None:
    """Raise if one of the cache's own files is a symlink: it could point anywhere, and the
    store deletes blobs and orphans in ``blobs/`` and writes the index and lock."""
    for name in _OWN_FILES:
        p = directory / name
        if p.is_symlink():
            raise CacheIndexError(
                f"{p} is a symbolic link (to {os.readlink(p)}): a cache keeps its index, lock and "
                "blobs inside its own directory and refuses to follow links out of it; replace "
                "the link with the real file or directory (or point the cache at the target)"
            )


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    # O_NOFOLLOW: a blob swapped for a symlink between the caller's check and this open is not
    # followed (ELOOP -> OSError -> reported as unreadable)
    with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class DiskCacheStore(AbstractCacheStore):
    """A persistent cache in ``directory``, safe to share between processes.

    Args:
        directory: the cache directory (created if missing unless ``create=False``).
        max_bytes: evict least-recently-used entries while the blobs total more than this.
        max_entries: evict least-recently-used entries while there are more than this.
        create: create the cache if missing (else ``FileNotFoundError`` unless ``directory``
            already holds a cache index).
        clock: time source for created / last-used stamps (tests inject a counter).

    Opening garbage-collects blobs no index row owns (a crash between a blob write and its
    index commit); their names are in :attr:`collected`. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_bytes: int | None = None,
        max_entries: int | None = None,
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(clock=clock)
        self.max_bytes = _check_limit(max_bytes, "max_bytes")
        self.max_entries = _check_limit(max_entries, "max_entries")
        self.directory = Path(directory)
        if not create and not (self.directory / "index.sqlite").is_file():
            raise FileNotFoundError(
                f"{self.directory} does not exist or is not an rfmpc cache (no index.sqlite)"
            )
        if not self.directory.is_dir():
            if self.directory.exists():
                raise FileNotFoundError(f"cache directory {self.directory} is not a directory")
        self.blob_dir = self.directory / "blobs"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _refuse_symlinks(self.directory)
            self.blob_dir.mkdir(exist_ok=True)
            self._lock_file = open(self.directory / ".lock", "a+b")
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                raise _not_writable(self.directory, e, "opening the cache") from e
            raise
        self._blob_root = self.blob_dir.resolve()
        self._tlock = threading.RLock()
        self._lock_depth = 0
        self._conn: sqlite3.Connection | None = None
        self._index = SimilarityIndex()
        self._seq = 0
        try:
            self._conn = sqlite3.connect(
                self.directory / "index.sqlite", timeout=60.0, isolation_level=None
            )
            with self._locked():
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.executescript(_SCHEMA)
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (_SCHEMA_VERSION,)
                )
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('changes_floor', '0')")
                version = self._meta("schema_version")
                if version != _SCHEMA_VERSION:
                    raise CacheIndexError(
                        f"{self.directory}: cache index version {version!r} is not supported "
                        f"(expects {_SCHEMA_VERSION}); clear or move the directory"
                    )
                self.collected: list[str] = self._collect_orphans()
            self._rebuild()
        except sqlite3.DatabaseError as e:
            self.close()
            raise CacheIndexError(
                f"{self.directory / 'index.sqlite'}: unreadable cache index ({e}); move the "
                "directory away and start a new cache"
            ) from e
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if not self._lock_file.closed:
            self._lock_file.close()

    def __enter__(self) -> DiskCacheStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"cache store {self.directory} is closed")
        return self._conn

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive inter-process lock (``flock`` on ``DIR/.lock``); re-entrant in-process."""
        with self._tlock:
            if self._lock_depth == 0:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _tx(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        conn = self.conn
        conn.execute(f"BEGIN {mode}")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def blob_path(self, entry_id: str) -> Path:
        """``DIR/blobs/<id>.safetensors`` for a valid id (``CacheEntryError`` otherwise)."""
        eid = validate_entry_id(entry_id)
        path = self.blob_dir / f"{eid}{_BLOB_SUFFIX}"
        if path.parent.resolve() != self._blob_root:  # defence in depth (a symlinked blobs/)
            raise CacheEntryError(f"blob path {path} escapes the cache directory")
        return path

    def _log(self, conn: sqlite3.Connection, op: str, ids: Sequence[str | None]) -> None:
        conn.executemany("INSERT INTO changes (op, entry_id) VALUES (?, ?)", [(op, e) for e in ids])
        (last,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()
        floor = last - _KEEP_CHANGES
        if floor > int(self._meta("changes_floor") or 0):
            conn.execute("DELETE FROM changes WHERE seq <= ?", (floor,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'changes_floor'", (str(floor),))

    def _unlink_blob(self, entry_id: str) -> None:
        try:
            path = self.blob_path(entry_id)
        except CacheEntryError:
            return  # an invalid id never names a file we may delete
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _collect_orphans(self, *, delete: bool = True) -> list[str]:
        """Blob-dir files no index row owns (call under the lock). Deletes only our own kinds
        of file (``<id>.safetensors`` and atomic-write temp files); lists foreign ones."""
        ids = {r[0] for r in self.conn.execute("SELECT id FROM entries")}
        found = []
        for p in sorted(self.blob_dir.iterdir()):
            name = p.name
            stem = name[: -len(_BLOB_SUFFIX)] if name.endswith(_BLOB_SUFFIX) else None
            ours_tmp = name.startswith(".") and name.endswith(".tmp")
            if stem is not None and stem in ids:
                continue
            found.append(name)
            is_blob = stem is not None and _valid_id(stem)
            if delete and (is_blob or ours_tmp) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return found

    # ------------------------------------------------------------------ in-memory index sync
    def _add_rows(self, rows) -> None:
        groups: dict[tuple[str, str], tuple[list[str], list[np.ndarray]]] = {}
        for eid, model_id, chash, dim, blob in rows:
            if eid in self._quarantined:
                continue
            vec = np.frombuffer(blob, dtype="<f4") if isinstance(blob, bytes) else None
            if vec is None or vec.shape[0] != dim or dim == 0 or not np.all(np.isfinite(vec)):
                self._report(eid, _damaged("bad_row", f"index row {eid!r}: malformed embedding"))
                continue
            if not np.any(vec):
                self._report(eid, _damaged("bad_row", f"index row {eid!r}: zero embedding"))
                continue
            ids, vecs = groups.setdefault((model_id, chash), ([], []))
            ids.append(eid)
            vecs.append(vec)
        for (model_id, chash), (ids, vecs) in groups.items():
            try:
                self._index.add_many(ids, np.stack(vecs), model_id=model_id, config_hash=chash)
            except ValueError as e:  # e.g. an embedding size that differs within a group
                for eid in ids:
                    if eid not in self._index:
                        self._report(eid, _damaged("bad_row", f"index row {eid!r}: {e}"))

    def _rebuild(self) -> None:
        with self._tx("DEFERRED") as conn:
            floor = int(self._meta("changes_floor") or 0)
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), ?) FROM changes", (floor,)).fetchone()
            rows = conn.execute(
                "SELECT id, model_id, config_hash, dim, pooled FROM entries"
            ).fetchall()
        self._index.clear()
        self._add_rows(rows)
        self._seq = seq

    def _sync(self) -> None:
        """Apply other processes' puts / evictions since the last sync (the change log)."""
        with self._tx("DEFERRED") as conn:
            floor = int(self._meta("changes_floor") or 0)
            if self._seq < floor:
                lagging = True
            else:
                lagging = False
                changes = conn.execute(
                    "SELECT seq, op, entry_id FROM changes WHERE seq > ? ORDER BY seq", (self._seq,)
                ).fetchall()
                added: dict[str, None] = {}
                for _, op, eid in changes:
                    if op == "put":
                        added[eid] = None
                    elif op == "del":
                        added.pop(eid, None)
                        self._index.remove(eid)
                        self._quarantined.discard(eid)
                    elif op == "clear":
                        added.clear()
                        self._index.clear()
                        self._quarantined.clear()
                rows = []
                ids = list(added)
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    rows += conn.execute(
                        "SELECT id, model_id, config_hash, dim, pooled FROM entries WHERE id IN "
                        f"({','.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                if changes:
                    self._seq = changes[-1][0]
        if lagging:
            self._rebuild()
        else:
            self._add_rows(rows)

    # ------------------------------------------------------------------ writes
    def put(self, prompt, pooled, states, *, model_id, config_hash, extras=None) -> str:
        entry = _new_entry(prompt, pooled, states, model_id, config_hash, 0.0, extras)  # checks
        eid = entry.entry_id
        path = self.blob_path(eid)
        with self._locked():
            # Stamp the entry under the lock: a stamp taken before waiting for it would be older
            # than entries other processes commit meanwhile, and LRU would evict this fresh
            # entry first. Stamps taken here follow commit order.
            now = float(self._clock())
            entry = dataclasses.replace(entry, created=now, last_used=now)
            tensors, metadata = entry_to_tensors(entry)
            try:
                save_safetensors(path, tensors, metadata)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(
                        e.errno,
                        f"cache directory {self.directory} is full ({os.strerror(e.errno)}) while "
                        f"writing entry {eid}: free space, lower max_bytes or run `rfmpc cache "
                        "clear`; nothing was written",
                    ) from e
                if e.errno in _NOT_WRITABLE:
                    raise _not_writable(self.directory, e, f"writing entry {eid}") from e
                raise
            try:
                sha, size = _sha256_file(path)
                if self.max_bytes is not None and size > self.max_bytes:
                    raise ValueError(
                        f"entry of {size} bytes exceeds max_bytes={self.max_bytes}: raise the "
                        "limit or cache fewer states"
                    )
                pooled32 = np.asarray(entry.pooled, dtype="<f4")
                with self._tx() as conn:
                    conn.execute(
                        "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            eid,
                            entry.prompt,
                            entry.model_id,
                            entry.config_hash,
                            json.dumps(list(entry.steps)),
                            entry.num_steps,
                            int(pooled32.shape[0]),
                            pooled32.tobytes(),
                            sha,
                            size,
                            entry.created,
                            entry.last_used,
                        ),
                    )
                    self._log(conn, "put", [eid])
            except BaseException:
                self._unlink_blob(eid)
                raise
            self._evict(keep=eid)
        self._sync()
        return eid

    def _evict(self, keep: str | None = None) -> list[str]:
        """Drop least-recently-used entries beyond the limits (call under the lock)."""
        if self.max_entries is None and self.max_bytes is None:
            return []
        with self._tx() as conn:
            count, total = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM entries"
            ).fetchone()
            over_n = self.max_entries is not None and count > self.max_entries
            over_b = self.max_bytes is not None and total > self.max_bytes
            if not (over_n or over_b):
                return []
            rows = conn.execute(
                "SELECT id, nbytes FROM entries WHERE id != ? ORDER BY last_used, created, rowid",
                (keep or "",),
            ).fetchall()
            victims = _lru_victims(rows, count, total, self.max_entries, self.max_bytes)
            self._delete_rows(conn, victims)
        for eid in victims:
            self._unlink_blob(eid)
        return victims

    def _delete_rows(self, conn: sqlite3.Connection, ids: Sequence[str]) -> None:
        conn.executemany("DELETE FROM entries WHERE id = ?", [(e,) for e in ids])
        if ids:
            self._log(conn, "del", ids)

    def clear(self) -> int:
        with self._locked():
            with self._tx() as conn:
                ids = [r[0] for r in conn.execute("SELECT id FROM entries")]
                conn.execute("DELETE FROM entries")
                self._log(conn, "clear", [None])
            for eid in ids:
                self._unlink_blob(eid)
            self._collect_orphans()
        self._sync()
        return len(ids)

    # ------------------------------------------------------------------ reads
    def _row(self, entry_id: str):
        return self.conn.execute(
            "SELECT sha256, nbytes, last_used, model_id, config_hash FROM entries WHERE id = ?",
            (entry_id,),
        ).fetchone()

    def _check_blob(self, entry_id: str, row) -> CacheEntry:
        """Load ``entry_id``'s blob and check it against its index ``row``."""
        sha, nbytes, last_used, model_id, chash = row
        try:
            path = self.blob_path(entry_id)
        except CacheEntryError as e:
            raise _damaged("invalid_id", str(e)) from None
        if path.is_symlink():
            raise _damaged("corrupted", f"{path}: the blob is a symlink, not a file we wrote")
        try:
            got_sha, size = _sha256_file(path)
        except FileNotFoundError:
            if self._row(entry_id) is None:
                raise _Vanished(entry_id) from None
            raise _damaged("missing", f"{path}: blob file is missing") from None
        except OSError as e:
            raise _damaged("unreadable", f"{path}: {e}") from None
        if size != nbytes:
            kind = "truncated" if size < nbytes else "corrupted"
            raise _damaged(kind, f"{path}: {size} bytes, the index recorded {nbytes}")
        if got_sha != sha:
            raise _damaged("corrupted", f"{path}: SHA-256 differs from the index's")
        try:
            tensors, metadata = load_safetensors(path)
            entry = entry_from_tensors(
                tensors, metadata, source=str(path), last_used=last_used, nbytes=size
            )
        except FileNotFoundError:
            raise _Vanished(entry_id) from None
        except (SafetensorsReadError, CacheEntryError) as e:
            if self._row(entry_id) is None:
                raise _Vanished(entry_id) from None
            raise _damaged("corrupted", str(e)) from None
        if (entry.entry_id, entry.model_id, entry.config_hash) != (entry_id, model_id, chash):
            raise _damaged(
                "mismatch",
                f"{path}: the blob holds entry {entry.entry_id} ({entry.model_id}, "
                f"{entry.config_hash[:12]}) but the index row says {entry_id} ({model_id}, "
                f"{chash[:12]})",
            )
        return entry

    def _load(self, entry_id: str) -> CacheEntry:
        row = self._row(entry_id)
        if row is None:
            raise _Vanished(entry_id)
        return self._check_blob(entry_id, row)

    def get(self, entry_id: str) -> CacheEntry:
        row = self._row(entry_id)
        if row is None:
            raise KeyError(f"no cache entry {entry_id!r} in {self.directory}")
        try:
            return self._check_blob(entry_id, row)
        except _Vanished:
            raise KeyError(f"cache entry {entry_id!r} was removed concurrently") from None
        except CacheEntryError as e:
            raise _damaged(
                getattr(e, "kind", "corrupted"),
                f"{e}; run `rfmpc cache verify --repair --cache {self.directory}` to remove it",
            ) from None

    def _ids_with_prompt(self, prompt, model_id, config_hash):
        rows = self.conn.execute(
            "SELECT id FROM entries WHERE prompt = ? AND model_id = ? AND config_hash = ? "
            "ORDER BY created DESC",
            (prompt, model_id, config_hash),
        ).fetchall()
        return [r[0] for r in rows]

    def _candidates(self, q, model_id, config_hash, k, floor, exclude):
        self._sync()
        return self._index.nearest(
            q,
            model_id=model_id,
            config_hash=config_hash,
            k=k,
            min_similarity=floor,
            exclude=exclude | self._quarantined,
        )

    def _touch(self, entry_id: str, when: float) -> None:
        # Best effort: the LRU order may lose a touch if the database stays locked for a minute.
        with contextlib.suppress(sqlite3.OperationalError):
            self.conn.execute(
                "UPDATE entries SET last_used = ? WHERE id = ? AND last_used < ?",
                (when, entry_id, when),
            )

    def _forget(self, entry_id: str) -> None:
        self._index.remove(entry_id)

    def ls(self) -> list[EntryInfo]:
        rows = self.conn.execute(
            "SELECT id, prompt, model_id, config_hash, steps, num_steps, dim, nbytes, created, "
            "last_used FROM entries ORDER BY last_used DESC, created DESC"
        ).fetchall()
        out = []
        for r in rows:
            try:
                steps = tuple(int(s) for s in json.loads(r[4]))
            except (ValueError, TypeError):
                steps = ()
            out.append(EntryInfo(r[0], r[1], r[2], r[3], steps, *r[5:]))
        return out

    def verify(self, *, repair: bool = False) -> VerifyReport:
        """Check every blob against its index row (size, SHA-256, inner checksums, ids).

        With ``repair=True``, damaged entries' rows (and blobs, if the id is valid) and orphan
        files are removed. Runs under the write lock, so it never races a put.
        """
        with self._locked():
            rows = self.conn.execute(
                "SELECT id, sha256, nbytes, last_used, model_id, config_hash FROM entries"
            ).fetchall()
            ok, problems = [], []
            for eid, *row in rows:
                try:
                    self._check_blob(eid, row)
                    ok.append(eid)
                except CacheEntryError as e:
                    problems.append(CacheProblem(eid, getattr(e, "kind", "corrupted"), str(e)))
                except _Vanished:
                    problems.append(CacheProblem(eid, "missing", f"blob of {eid!r} is missing"))
            orphans = self._collect_orphans(delete=repair)
            if repair and problems:
                bad = [p.entry_id for p in problems]
                with self._tx() as conn:
                    self._delete_rows(conn, bad)
                for eid in bad:
                    self._unlink_blob(eid)
        if repair:
            self._sync()
        else:
            for p in problems:  # keep lookups in this process off damaged entries
                self._quarantined.add(p.entry_id)
                self._forget(p.entry_id)
        return VerifyReport(len(rows), tuple(ok), tuple(problems), tuple(orphans), repair)

    def __len__(self) -> int:
        (n,) = self.conn.execute("SELECT COUNT(*) FROM entries").fetchone()
        return int(n)

    def __contains__(self, entry_id: object) -> bool:
        return self._row(str(entry_id)) is not None

    def total_bytes(self) -> int:
        (n,) = self.conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM entries").fetchone()
        return int(n)


def _valid_id(s: str) -> bool:
    try:
        validate_entry_id(s)
        return True
    except CacheEntryError:
        return False
