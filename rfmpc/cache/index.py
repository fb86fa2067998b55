"""An exact, vectorised cosine-similarity index over pooled prompt embeddings.

Entries are grouped by compatibility key ``(model_id, config_hash)``: a query only ever sees
entries of its own model, resolution and schedule, and a group is one contiguous, L2-normalised
``(n, d)`` float32 matrix, so a lookup is a matrix-vector product plus ``argpartition``.

For large embeddings (SD3's pooled vectors are 2048-d: ``100k x 2048`` float32 is 819 MB, and one
pass over it is memory-bandwidth bound, ~70-100 ms on the 2-core CPU this was developed on) the
group also keeps a low-rank sketch that lets most rows be ruled out *exactly* without reading
them. With an orthonormal basis ``P`` (``r x d``, the top right-singular vectors of a sample of
the stored rows; a randomized SVD, Halko, Martinsson & Tropp 2011) every unit row splits as
``m = P^T z + e`` with ``z = P m`` and ``|e| = sqrt(1 - |z|^2)``, and by Cauchy-Schwarz

    q . m  <=  (P q) . z  +  |e_q| |e_m|.

One pass over the ``(n, r)`` sketch gives that upper bound for every row; only rows whose bound
can still beat the best exact similarity found so far (or ``min_similarity``) are re-scored in
full. The answer is therefore always the exact top-k (the basis only affects speed: rows added
after the fit are projected on the current basis, with their own exact residual norms), and
falls back to the full scan when the bound prunes too little. Embeddings of text prompts are
strongly anisotropic, so a few hundred components hold most of their energy; for isotropic
random vectors the bound prunes only against a high ``min_similarity``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["SimilarityIndex"]

# Float32 slack added to every Cauchy-Schwarz bound: the sketch and the exact scores are computed
# in float32 (accumulation error ~ sqrt(d) * 2^-24 per dot product of unit vectors), so a bound
# must be loosened by more than that to stay an upper bound of the float32 exact score.
_BOUND_SLACK = 1e-4


def _as_unit_vector(v, what: str) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(
            f"{what} must be a 1-D embedding vector (or shape (1, d)), got shape {np.shape(v)}"
        )
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or inf")
    norm = float(np.linalg.norm(a.astype(np.float64)))
    if norm == 0.0:
        raise ValueError(f"{what} is the zero vector: cosine similarity is undefined for it")
    return (a / np.float32(norm)).astype(np.float32)


def _orthonormal_columns(y: np.ndarray, passes: int = 2) -> np.ndarray:
    """An orthonormal basis of the column span of ``y`` (CholeskyQR via Gram ``eigh``).

    Null directions are dropped; a second pass restores float32 orthonormality.
    """
    q = y
    for _ in range(passes):
        lam, v = np.linalg.eigh((q.T @ q).astype(np.float64))
        keep = lam > lam.max() * 1e-10
        q = (q.astype(np.float64) @ (v[:, keep] / np.sqrt(lam[keep]))).astype(np.float32)
    return q


class _Group:
    """One compatibility group: a growable normalised matrix plus the optional sketch."""

    def __init__(self, dim: int, *, project_above_dim: int, min_rows_to_project: int, seed: int):
        self.dim = dim
        self.n = 0
        self.vecs = np.empty((16, dim), np.float32)
        self.ids: list[str] = []
        self.row: dict[str, int] = {}
        self.basis: np.ndarray | None = None  # (r, d)
        self.sketch: np.ndarray | None = None  # (capacity, r)
        self.resid: np.ndarray | None = None  # (capacity,)
        self.fitted_n = 0
        self.project_above_dim = project_above_dim
        self.min_rows_to_project = min_rows_to_project
        self.seed = seed

    # ------------------------------------------------------------------ storage
    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = self.vecs.shape[0]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        vecs = np.empty((new_cap, self.dim), np.float32)
        vecs[: self.n] = self.vecs[: self.n]
        self.vecs = vecs
        if self.basis is not None:
            sketch = np.empty((new_cap, self.basis.shape[0]), np.float32)
            sketch[: self.n] = self.sketch[: self.n]
            resid = np.empty(new_cap, np.float32)
            resid[: self.n] = self.resid[: self.n]
            self.sketch, self.resid = sketch, resid

    def add(self, ids: Sequence[str], unit: np.ndarray) -> None:
        self._reserve(len(ids))
        lo, hi = self.n, self.n + len(ids)
        self.vecs[lo:hi] = unit
        for i, eid in enumerate(ids):
            self.row[eid] = lo + i
        self.ids.extend(ids)
        self.n = hi
        if self.basis is not None:
            self._project_rows(lo, hi)
        self._maybe_fit()

    def remove(self, eid: str) -> None:
        i = self.row.pop(eid)
        last = self.n - 1
        if i != last:  # swap-remove: move the last row into the hole
            self.vecs[i] = self.vecs[last]
            moved = self.ids[last]
            self.ids[i] = moved
            self.row[moved] = i
            if self.basis is not None:
                self.sketch[i] = self.sketch[last]
                self.resid[i] = self.resid[last]
        self.ids.pop()
        self.n = last

    # ------------------------------------------------------------------ sketch
    def _project_rows(self, lo: int, hi: int, chunk: int = 8192) -> None:
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            z = self.vecs[a:b] @ self.basis.T
            self.sketch[a:b] = z
            self.resid[a:b] = np.sqrt(np.maximum(0.0, 1.0 - np.einsum("ij,ij->i", z, z)))

    def _maybe_fit(self) -> None:
        if self.dim <= self.project_above_dim or self.n < self.min_rows_to_project:
            return
        if self.basis is not None and self.n < 2 * self.fitted_n:
            return
        self.fit()

    def fit(self, sample: int = 4096) -> None:
        """(Re)compute the sketch basis by a randomized SVD of a sample of the rows.

        Halko, Martinsson & Tropp (2011), Alg. 4.4 with one power iteration; the small
        orthonormalisations go through ``eigh`` of ``l x l`` Gram matrices (much faster than
        Householder QR of the tall ``sample x l`` blocks on a busy CPU, and accurate enough
        here: the bound's exactness never depends on the basis, only its tightness does).
        """
        rng = np.random.default_rng(self.seed)
        rows = self.vecs[: self.n]
        if self.n > sample:
            rows = rows[np.sort(rng.choice(self.n, sample, replace=False))]
        r_max = max(32, self.dim // 4)
        # Try a small rank first (text embeddings are strongly anisotropic); widen if 90% of
        # the energy is not inside it.
        for r_try in sorted({min(64, r_max), r_max}):
            ell = min(r_try + 16, *rows.shape)
            y = rows @ rng.standard_normal((self.dim, ell), dtype=np.float32)
            y = _orthonormal_columns(rows @ (rows.T @ _orthonormal_columns(y, 1)), 1)
            b = y.T @ rows  # (l, d): rows ~= y @ b
            lam, u = np.linalg.eigh((b @ b.T).astype(np.float64))
            lam, u = lam[::-1], u[:, ::-1]
            keep = lam > lam[0] * 1e-10
            lam, u = lam[keep], u[:, keep]
            energy = np.cumsum(lam) / float(rows.shape[0])  # unit rows: total energy 1 per row
            # Smallest rank holding 90% of the sample's energy, at least 32, at most r_try.
            r = int(np.searchsorted(energy, 0.9) + 1)
            if r <= min(r_try, lam.size):
                break
        r = int(min(max(r, min(32, lam.size)), r_try, lam.size))
        vt = (u[:, :r] / np.sqrt(lam[:r])).T @ b.astype(np.float64)  # top right-singular vecs
        basis = _orthonormal_columns(vt.T.astype(np.float32)).T.copy()
        orth_err = float(np.abs(basis @ basis.T - np.eye(basis.shape[0], dtype=np.float32)).max())
        if orth_err > 1e-5:  # the bound needs orthonormal rows; never trade exactness for speed
            self.basis = self.sketch = self.resid = None
            self.fitted_n = self.n
            return
        self.basis = basis
        cap = self.vecs.shape[0]
        self.sketch = np.empty((cap, self.basis.shape[0]), np.float32)
        self.resid = np.empty(cap, np.float32)
        self._project_rows(0, self.n)
        self.fitted_n = self.n

    # ------------------------------------------------------------------ search
    def search(
        self, q: np.ndarray, k: int, floor: float | None, exclude: set[str]
    ) -> list[tuple[str, float]]:
        n = self.n
        if n == 0:
            return []
        vecs = self.vecs[:n]
        k_eff = min(n, k + len(exclude))
        if self.basis is None or n < 4 * (k_eff + 64):
            scores = vecs @ q
            return self._top(np.arange(n), scores, k, floor, exclude)

        zq = self.basis @ q
        rq = float(np.sqrt(max(0.0, 1.0 - float(zq @ zq))))
        upper = self.sketch[:n] @ zq
        upper += self.resid[:n] * np.float32(rq) + np.float32(_BOUND_SLACK)
        cand = np.flatnonzero(upper >= floor) if floor is not None else None
        if cand is not None and cand.size == 0:
            return []
        # Score the most promising rows exactly, then every row whose bound still beats the
        # k-th best exact score; the rest provably cannot enter the top k.
        pool = cand if cand is not None else np.arange(n)
        m = min(pool.size, 4 * k_eff + 64)
        first = pool[np.argpartition(-upper[pool], m - 1)[:m]] if m < pool.size else pool
        exact = vecs[first] @ q
        kth = -2.0  # fewer exact scores than k: every candidate is still in the running
        if exact.size >= k_eff:
            kth = float(np.partition(exact, exact.size - k_eff)[exact.size - k_eff])
        thresh = max(kth, floor if floor is not None else -2.0)
        mask = upper >= np.float32(thresh)
        mask[first] = False
        rest = np.flatnonzero(mask)
        if rest.size > n // 4:  # the bound prunes too little: a full scan is cheaper
            return self._top(np.arange(n), vecs @ q, k, floor, exclude)
        idx = np.concatenate([first, rest])
        scores = np.concatenate([exact, vecs[rest] @ q]) if rest.size else exact
        return self._top(idx, scores, k, floor, exclude)

    def _top(self, idx, scores, k, floor, exclude) -> list[tuple[str, float]]:
        if floor is not None:
            keep = scores >= np.float32(floor)
            idx, scores = idx[keep], scores[keep]
        want = min(idx.size, k + len(exclude))
        if want == 0:
            return []
        if want < idx.size:
            part = np.argpartition(-scores, want - 1)[:want]
            idx, scores = idx[part], scores[part]
        order = np.lexsort((idx, -scores))  # by score desc, ties by row
        out = []
        for j in order:
            eid = self.ids[int(idx[j])]
            if eid in exclude:
                continue
            out.append((eid, float(np.clip(scores[j], -1.0, 1.0))))
            if len(out) == k:
                break
        return out


class SimilarityIndex:
    """Exact cosine-similarity top-k over embeddings, partitioned by ``(model_id, config_hash)``.

    Vectors are L2-normalised on insertion; similarities are float32 dot products of unit
    vectors, clipped to [-1, 1]. Adds and removals are incremental (amortised O(d) per add,
    swap-remove O(d) per removal).

    Args:
        project_above_dim: embeddings longer than this get the low-rank pruning sketch
            (shorter ones are scanned in full, which is already fast: 100k x 256 is 100 MB).
        min_rows_to_project: a group fits its sketch once it holds this many rows (and refits
            whenever it has doubled since the last fit).
        seed: seed of the randomized SVD (results never depend on it, only speed).
    """

    def __init__(
        self, *, project_above_dim: int = 256, min_rows_to_project: int = 2048, seed: int = 0
    ):
        self._groups: dict[tuple[str, str], _Group] = {}
        self._where: dict[str, tuple[str, str]] = {}
        self._opts = dict(
            project_above_dim=project_above_dim, min_rows_to_project=min_rows_to_project, seed=seed
        )

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._where

    def ids(self) -> list[str]:
        return list(self._where)

    def add(self, entry_id: str, vector, *, model_id: str, config_hash: str) -> None:
        """Insert one embedding (replacing an existing one with the same id)."""
        vec = _as_unit_vector(vector, "vector")[None]
        self.add_many([entry_id], vec, model_id=model_id, config_hash=config_hash)

    def add_many(
        self, entry_ids: Sequence[str], vectors, *, model_id: str, config_hash: str
    ) -> None:
        """Insert ``(len(entry_ids), d)`` embeddings of one compatibility group at once."""
        entry_ids = list(entry_ids)
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(entry_ids):
            raise ValueError(
                f"vectors must have shape (len(entry_ids)={len(entry_ids)}, d), got {vecs.shape}"
            )
        if not entry_ids:
            return
        if len(set(entry_ids)) != len(entry_ids):
            raise ValueError("entry_ids contains duplicates")
        if not np.all(np.isfinite(vecs)):
            raise ValueError("vectors contain NaN or inf")
        norms = np.linalg.norm(vecs, axis=1)
        if np.any(norms == 0):
            raise ValueError("vectors contain a zero vector: cosine similarity is undefined")
        unit = (vecs / norms[:, None]).astype(np.float32)
        key = (str(model_id), str(config_hash))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(vecs.shape[1], **self._opts)
        elif group.dim != vecs.shape[1]:
            raise ValueError(
                f"embedding size {vecs.shape[1]} differs from the {group.dim} of the entries "
                f"already indexed for model_id={model_id!r}, config_hash={config_hash!r}"
            )
        for eid in entry_ids:
            if eid in self._where:
                self.remove(eid)
        group.add(entry_ids, unit)
        for eid in entry_ids:
            self._where[eid] = key

    def remove(self, entry_id: str) -> bool:
        """Drop an id; returns whether it was present."""
        key = self._where.pop(entry_id, None)
        if key is None:
            return False
        group = self._groups[key]
        group.remove(entry_id)
        if group.n == 0:
            del self._groups[key]
        return True

    def clear(self) -> None:
        self._groups.clear()
        self._where.clear()

    def nearest(
        self,
        query,
        *,
        model_id: str,
        config_hash: str,
        k: int = 1,
        min_similarity: float | None = None,
        exclude: Iterable[str] = (),
    ) -> list[tuple[str, float]]:
        """The ``k`` most cosine-similar compatible entries, best first: ``[(entry_id, sim)]``.

        Only entries indexed with the same ``model_id`` and ``config_hash`` are candidates.
        ``min_similarity`` drops (and lets the search prune) entries below it; ids in
        ``exclude`` are skipped. Exact: equal to a brute-force scan of the group.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if min_similarity is not None and not -1.0 <= float(min_similarity) <= 1.0:
            raise ValueError(f"min_similarity must be in [-1, 1], got {min_similarity}")
        group = self._groups.get((str(model_id), str(config_hash)))
        q = _as_unit_vector(query, "query")
        if group is None:
            return []
        if q.shape[0] != group.dim:
            raise ValueError(
                f"query has {q.shape[0]} dims but entries for model_id={model_id!r} have "
                f"{group.dim}: embed the prompt with the same encoder"
            )
        floor = None if min_similarity is None else float(min_similarity)
        return group.search(q, int(k), floor, set(exclude))
