"""The trajectory cache: entries, similarity index, resume policy, memory/disk stores, CLI."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rfmpc.cache import (
    CacheEntryError,
    CacheHit,
    CacheWarning,
    DiskCacheStore,
    MemoryCacheStore,
    ResumePolicy,
    SimilarityIndex,
    config_hash,
)
from rfmpc.cli import main
from rfmpc.flow import TrajectoryState, flowmatch_sigmas, integrate
from rfmpc.io import load_safetensors

N_STEPS = 8
SIGMAS = flowmatch_sigmas(N_STEPS, shift=3.0)
CFG = config_hash(model="tiny", latent_shape=(1, 4, 4, 3), num_steps=N_STEPS, shift=3.0)


def _field(x, sigma, cond):
    scale = cond["scale"].reshape(1, 1, 1, -1)
    return jnp.tanh(x * scale) * (1.0 + sigma) - cond["bias"][0].reshape(1, 1, 1, -1)


def _states(seed: int, steps=(0, 3, 5)) -> dict[int, TrajectoryState]:
    """States of one synthetic run (distinct latents, shared grid / key / cond); numpy-made, so
    the writer subprocesses need no JAX compilation."""
    rng = np.random.default_rng(seed)
    key = jax.random.wrap_key_data(np.array([seed, 12345], np.uint32))
    cond = {
        "scale": rng.standard_normal((1, 3)).astype(np.float32),
        "bias": [np.arange(3, dtype=np.float32) * seed, (np.int32(seed),)],
    }
    out = {}
    for s in steps:
        x = rng.standard_normal((1, 4, 4, 3)).astype(np.float32)
        out[s] = TrajectoryState(x, s, SIGMAS, key, cond, meta={"prompt": f"p{seed}", "s": s})
    return out


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _at_similarity(q, sim, seed):
    """A vector with cosine similarity exactly ``sim`` to ``q`` (up to float32 rounding)."""
    q = _unit(q)
    u = np.random.default_rng(seed).standard_normal(q.shape)
    u = _unit(u - (u @ q) * q)
    return (sim * q + np.sqrt(1 - sim**2) * u).astype(np.float32)


def _assert_states_equal(a: TrajectoryState, b: TrajectoryState):
    for name in ("x", "step", "sigmas"):
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
    assert np.array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    assert str(jax.random.key_impl(a.key)) == str(jax.random.key_impl(b.key))
    la, ta = jax.tree_util.tree_flatten(a.cond)
    lb, tb = jax.tree_util.tree_flatten(b.cond)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert a.meta == b.meta


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        self.t += 1.0
        return self.t


@pytest.fixture(params=["memory", "disk"])
def make_store(request, tmp_path):
    opened = []

    def make(**kw):
        if request.param == "memory":
            s = MemoryCacheStore(**kw)
        else:
            s = DiskCacheStore(tmp_path / f"cache{len(opened)}", **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        if isinstance(s, DiskCacheStore):
            s.close()


# ---------------------------------------------------------------------------- entries
def test_config_hash_is_canonical_and_sensitive():
    a = config_hash(model={"w": 64, "layers": 2}, latent_shape=(1, 8, 8, 4), shift=3.0)
    b = config_hash(shift=3.0, latent_shape=[1, 8, 8, 4], model={"layers": 2, "w": 64})
    assert a == b and len(a) == 64
    assert a != config_hash(model={"w": 64, "layers": 2}, latent_shape=(1, 8, 8, 4), shift=1.0)
    assert a != config_hash(model={"w": 64, "layers": 2}, latent_shape=(1, 8, 8, 8), shift=3.0)
    assert config_hash(n=np.int64(3)) == config_hash(n=3)
    with pytest.raises(TypeError, match="JSON-like"):
        config_hash(fn=len)
    with pytest.raises(ValueError, match="finite"):
        config_hash(shift=float("nan"))


def test_roundtrip_bit_exact(make_store):
    store = make_store()
    states = _states(3)
    pooled = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    eid = store.put("a red square", pooled[None], states, model_id="tiny", config_hash=CFG)
    entry = store.get(eid)
    assert entry.entry_id == eid and entry.prompt == "a red square"
    assert entry.model_id == "tiny" and entry.config_hash == CFG
    assert entry.steps == (0, 3, 5) and entry.num_steps == N_STEPS
    assert entry.pooled.dtype == np.float32 and entry.pooled.tobytes() == pooled.tobytes()
    for s in (0, 3, 5):
        _assert_states_equal(entry.state(s), states[s])
    with pytest.raises(KeyError, match="caches steps"):
        entry.state(4)
    # a list of states works too and gives the same steps
    eid2 = store.put("b", pooled, list(states.values()), model_id="tiny", config_hash=CFG)
    assert store.get(eid2).steps == (0, 3, 5)
    assert len(store) == 2


def test_disk_blob_stores_shared_tensors_once(tmp_path):
    with DiskCacheStore(tmp_path / "c") as store:
        eid = store.put("p", np.ones(4), _states(1), model_id="tiny", config_hash=CFG)
        tensors, meta = load_safetensors(store.blob_path(eid))
    # 3 latents + 3 steps + pooled, and sigmas / key / 3 cond leaves once each (not 3 times)
    assert len(tensors) == 3 + 3 + 1 + 1 + 1 + 3
    assert json.loads(meta["entry"])["steps"] == [0, 3, 5]


def test_put_validates_input(make_store):
    store = make_store()
    st = _states(0)
    kw = dict(model_id="tiny", config_hash=CFG)
    with pytest.raises(ValueError, match="another sigma grid"):
        other = st[3].replace(sigmas=flowmatch_sigmas(N_STEPS, shift=1.0))
        store.put("p", np.ones(4), {0: st[0], 3: other}, **kw)
    with pytest.raises(ValueError, match="differs from that state's step"):
        store.put("p", np.ones(4), {2: st[3]}, **kw)
    with pytest.raises(ValueError, match="empty"):
        store.put("p", np.ones(4), {}, **kw)
    with pytest.raises(ValueError, match="non-zero"):
        store.put("p", np.zeros(4), st, **kw)
    with pytest.raises(ValueError, match=r"\(d,\)"):
        store.put("p", np.ones((2, 4)), st, **kw)
    with pytest.raises(TypeError, match="model_id"):
        store.put("p", np.ones(4), st, model_id="", config_hash=CFG)
    with pytest.raises(TypeError, match="dict"):
        store.put("p", np.ones(4), st[0], **kw)
    assert len(store) == 0


# ---------------------------------------------------------------------------- similarity
def test_nearest_returns_the_most_similar_compatible_entry(make_store):
    store = make_store()
    rng = np.random.default_rng(1)
    q = rng.standard_normal(32).astype(np.float32)
    kw = dict(model_id="tiny", config_hash=CFG)
    e90 = store.put("sim .90", _at_similarity(q, 0.90, 1), _states(1), **kw)
    e97 = store.put("sim .97", _at_similarity(q, 0.97, 2), _states(2), **kw)
    store.put("far", _at_similarity(q, -0.2, 3), _states(3), **kw)
    # exact matches from another model / config must never be returned for (tiny, CFG)
    other_model = store.put("other model", q, _states(4), model_id="big", config_hash=CFG)
    cfg2 = config_hash(model="tiny", latent_shape=(1, 8, 8, 3), num_steps=N_STEPS, shift=3.0)
    other_cfg = store.put("other cfg", q, _states(5), model_id="tiny", config_hash=cfg2)

    entry, sim = store.nearest(q, **kw)
    assert entry.entry_id == e97 and sim == pytest.approx(0.97, abs=1e-5)
    entry, sim = store.nearest(q, **kw, min_similarity=0.95)
    assert entry.entry_id == e97
    assert store.nearest(q, **kw, min_similarity=0.98) is None
    entry, sim = store.nearest(_at_similarity(q, 0.99, 9) * 5.0, **kw)  # scale-invariant
    assert entry.entry_id == e97
    assert store.nearest(q, model_id="big", config_hash=CFG)[0].entry_id == other_model
    assert store.nearest(q, model_id="tiny", config_hash=cfg2)[0].entry_id == other_cfg
    assert store.nearest(q, model_id="nope", config_hash=CFG) is None
    with pytest.raises(ValueError, match="dims"):
        store.nearest(np.ones(7), **kw)
    del e90


def _anisotropic(rng, n, d, rank=6):
    """Prompt-embedding-like vectors: a shared mean, a few latent factors, a little noise."""
    f32 = np.float32
    mix = rng.standard_normal((rank, d), dtype=f32)
    x = (
        f32(2.0) * rng.standard_normal(d, dtype=f32)
        + rng.standard_normal((n, rank), dtype=f32) @ mix
    )
    return x + f32(0.1) * rng.standard_normal((n, d), dtype=f32)


@pytest.mark.parametrize("kind", ["anisotropic", "isotropic"])
def test_index_is_exact_with_the_pruning_sketch(kind):
    """The low-rank Cauchy-Schwarz pruning never changes the answer (vs brute force)."""
    rng = np.random.default_rng(0)
    n, d = 700, 48
    x = _anisotropic(rng, n, d) if kind == "anisotropic" else rng.standard_normal((n, d))
    x = x.astype(np.float32)
    ids = [f"{i:032x}" for i in range(n)]
    idx = SimilarityIndex(project_above_dim=16, min_rows_to_project=64)
    idx.add_many(ids[:300], x[:300], model_id="m", config_hash="c")
    for i in range(300, n):  # incremental adds, projected on the existing basis / refits
        idx.add(ids[i], x[i], model_id="m", config_hash="c")
    for i in range(0, n, 7):  # swap-removals
        assert idx.remove(ids[i])
    assert idx._groups[("m", "c")].basis is not None  # the sketch path is exercised
    alive = np.array([i for i in range(n) if i % 7])
    unit = x[alive] / np.linalg.norm(x[alive], axis=1, keepdims=True)
    for t in range(40):
        base = x[alive[t * 5]]
        q = base + (0.05 if t % 2 else 1.0) * np.linalg.norm(base) * rng.standard_normal(d) / 7
        sims = unit @ (q / np.linalg.norm(q)).astype(np.float32)
        for k, floor in [(1, None), (5, None), (3, 0.5), (1, 0.999)]:
            got = idx.nearest(q, model_id="m", config_hash="c", k=k, min_similarity=floor)
            order = np.argsort(-sims, kind="stable")[:k]
            want = [(ids[alive[j]], float(sims[j])) for j in order]
            if floor is not None:
                want = [w for w in want if w[1] >= floor]
            assert [g[0] for g in got] == [w[0] for w in want]
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)


def test_index_10k_entries_2048d_answers_fast():
    """Loose bound (the 100k figure is benchmarks/cache_lookup.py's job)."""
    rng = np.random.default_rng(0)
    n, d = 10_000, 2048
    x = _anisotropic(rng, n, d, rank=24)
    idx = SimilarityIndex()
    idx.add_many([f"{i:032x}" for i in range(n)], x, model_id="m", config_hash="c")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    times = []
    for t in range(7):
        q = x[t * 31] + 0.1 * rng.standard_normal(d).astype(np.float32)
        t0 = time.perf_counter()
        got = idx.nearest(q, model_id="m", config_hash="c", min_similarity=0.85)
        times.append(time.perf_counter() - t0)
        assert got[0][0] == f"{int(np.argmax(unit @ q)):032x}"
    assert np.median(times) < 0.25, f"median lookup {np.median(times) * 1e3:.1f} ms"


# ---------------------------------------------------------------------------- policy
def test_policy_default_is_the_fitted_serving_band():
    pol = ResumePolicy()
    assert (pol.thresholds, pol.fractions, pol.min_similarity) == ((0.97,), (0.8,), 0.97)
    assert pol.choose_step(0.99, 28, range(29)) == 22
    assert pol.choose_step(0.96, 28, range(29)) is None  # an edit: generated, then cached
    wide = pol.with_lower_bands(ResumePolicy.edit_bands())
    assert (wide.thresholds, wide.fractions) == ((0.97, 0.95, 0.9, 0.85), (0.8, 0.45, 0.3, 0.2))
    assert [wide.choose_step(s, 28, range(29)) for s in (0.99, 0.96, 0.91, 0.86, 0.8)] == [
        22,
        12,
        8,
        5,
        None,
    ]
    # the command line's --min-similarity: the fitted band, then the edit bands down to X
    assert wide.with_min_similarity(0.92).thresholds == (0.97, 0.95, 0.92)
    assert wide.with_min_similarity(0.92).fractions == (0.8, 0.45, 0.3)
    # another policy's higher fractions are capped: a higher similarity never resumes earlier
    capped = ResumePolicy((0.9,), (0.2,)).with_lower_bands(ResumePolicy((0.85,), (0.5,)))
    assert capped.fractions == (0.2, 0.2)
    with pytest.raises(TypeError, match="other must be a ResumePolicy"):
        pol.with_lower_bands((0.9, 0.3))


def test_policy_edit_bands_mapping_and_monotonicity():
    pol = ResumePolicy.edit_bands()
    assert pol.min_similarity == 0.85
    all_steps = range(0, 29)
    assert pol.choose_step(0.97, 28, all_steps) == 12
    assert pol.choose_step(0.92, 28, all_steps) == 8
    assert pol.choose_step(0.86, 28, all_steps) == 5
    assert pol.choose_step(0.849, 28, all_steps) is None
    assert pol.choose_step(0.97, 28, [3, 10, 20]) == 10  # largest cached step <= target
    assert pol.choose_step(0.86, 28, [10, 20]) is None  # nothing cached early enough
    assert pol.choose_step(0.97, 28, [0]) is None  # resuming at 0 saves nothing
    sims = np.linspace(-1.0, 1.0, 2001)
    for n in (4, 8, 28, 50):
        for avail in (range(n + 1), [1, n // 2, n], [n // 4, n // 3]):
            steps = [pol.choose_step(s, n, avail) for s in sims]
            assert all(st is None for s, st in zip(sims, steps) if s < 0.85)
            as_int = [-1 if st is None else st for st in steps]
            assert all(a <= b for a, b in itertools.pairwise(as_int)), (n, list(avail))
            assert all(st is None or st in avail for st in steps)


def test_policy_validation():
    with pytest.raises(ValueError, match="strictly decreasing"):
        ResumePolicy(thresholds=(0.9, 0.95), fractions=(0.3, 0.4))
    with pytest.raises(ValueError, match="non-increasing"):
        ResumePolicy(thresholds=(0.95, 0.9), fractions=(0.3, 0.4))
    with pytest.raises(ValueError, match="equal length"):
        ResumePolicy(thresholds=(0.95,), fractions=(0.3, 0.2))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ResumePolicy(thresholds=(0.9,), fractions=(1.0,))
    with pytest.raises(ValueError, match="num_steps"):
        ResumePolicy().choose_step(0.99, 0, [1])


def test_lookup_resumes_exactly(make_store):
    """put a real run's states, look up with a similar prompt, finish it: bit-exact."""
    store = make_store()
    key = jax.random.key(7)
    cond = {"scale": jnp.full((1, 3), 0.7), "bias": [jnp.array([0.1, -0.2, 0.3])]}
    x0 = jax.random.normal(key, (1, 4, 4, 3))
    full = integrate(_field, x0, SIGMAS, cond, key=key)
    s2 = integrate(_field, x0, SIGMAS, cond, stop=2, key=key)
    q = np.arange(1.0, 9.0, dtype=np.float32)
    kw = dict(model_id="tiny", config_hash=CFG)
    store.put("a cat", q, [s2, full], **kw)  # the final state is a valid (step 8) state too
    bands = ResumePolicy.edit_bands()
    hit = store.lookup(_at_similarity(q, 0.96, 0), N_STEPS, bands, **kw)  # floor(.45*8) = 3
    assert isinstance(hit, CacheHit) and hit.step == 2
    entry, sim, _ = hit
    assert sim == pytest.approx(0.96, abs=1e-5) and entry.prompt == "a cat"
    resumed = integrate(_field, hit.state)
    assert np.asarray(resumed.x).tobytes() == np.asarray(full.x).tobytes()
    assert store.lookup(_at_similarity(q, 0.80, 1), N_STEPS, bands, **kw) is None
    assert store.lookup(_at_similarity(q, 0.96, 0), N_STEPS, **kw) is None  # default: >= 0.97
    strict = ResumePolicy(thresholds=(0.99,), fractions=(0.5,))
    assert store.lookup(_at_similarity(q, 0.96, 0), N_STEPS, strict, **kw) is None
    with pytest.raises(ValueError, match="num_steps"):
        store.lookup(q, 28, **kw)


# ---------------------------------------------------------------------------- eviction
def test_lru_eviction_by_entries(make_store):
    store = make_store(max_entries=3, clock=_Clock())
    kw = dict(model_id="tiny", config_hash=CFG)
    vecs = np.eye(8, dtype=np.float32)
    a, b, c = (store.put(n, vecs[i], _states(i, (2,)), **kw) for i, n in enumerate("abc"))
    assert store.nearest(vecs[0], **kw)[0].entry_id == a  # a is now the most recently used
    d = store.put("d", vecs[3], _states(3, (2,)), **kw)
    assert {i.entry_id for i in store.ls()} == {a, c, d}  # b (least recently used) evicted
    e = store.put("e", vecs[4], _states(4, (2,)), **kw)
    assert [i.entry_id for i in store.ls()] == [e, d, a]  # c evicted; most recent first
    assert store.nearest(vecs[1], **kw, min_similarity=0.5) is None  # b is really gone
    with pytest.raises(KeyError):
        store.get(b)


def test_lru_eviction_by_bytes(make_store):
    probe = make_store()
    kw = dict(model_id="tiny", config_hash=CFG)
    probe.put("x", np.ones(4), _states(0, (1, 2)), **kw)
    size = probe.ls()[0].nbytes
    store = make_store(max_bytes=int(2.5 * size), clock=_Clock())
    ids = [store.put(f"p{i}", np.ones(4) + i, _states(i, (1, 2)), **kw) for i in range(5)]
    infos = store.ls()
    assert [i.entry_id for i in infos] == ids[:2:-1]  # the 2 newest survive, newest first
    assert sum(i.nbytes for i in infos) <= 2.5 * size
    with pytest.raises(ValueError, match="max_bytes"):
        make_store(max_bytes=size // 2).put("big", np.ones(4), _states(0, (1, 2)), **kw)


def test_entry_larger_than_max_bytes_leaves_nothing_on_disk(tmp_path):
    with DiskCacheStore(tmp_path / "c", max_bytes=100) as store:
        with pytest.raises(ValueError, match="max_bytes"):
            store.put("big", np.ones(4), _states(0), model_id="tiny", config_hash=CFG)
        assert len(store) == 0 and list(store.blob_dir.iterdir()) == []


# ---------------------------------------------------------------------------- damage
def _damage_setup(path):
    store = DiskCacheStore(path)
    q = np.random.default_rng(5).standard_normal(24).astype(np.float32)
    kw = dict(model_id="tiny", config_hash=CFG)
    ids = [
        store.put(f"p{i}", _at_similarity(q, sim, i), _states(i), **kw)
        for i, sim in enumerate([0.99, 0.98, 0.97, 0.96])
    ]
    return store, q, kw, ids


def test_damaged_blobs_are_skipped_and_reported(tmp_path):
    store, q, kw, (flipped, truncated, deleted, intact) = _damage_setup(tmp_path / "c")
    p = store.blob_path(flipped)
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    p = store.blob_path(truncated)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    store.blob_path(deleted).unlink()

    with pytest.warns(CacheWarning) as rec:
        entry, sim = store.nearest(q, **kw)
    assert entry.entry_id == intact and sim == pytest.approx(0.96, abs=1e-5)
    assert [(pr.entry_id, pr.kind) for pr in store.problems] == [
        (flipped, "corrupted"),
        (truncated, "truncated"),
        (deleted, "missing"),
    ]
    assert len(rec) == 3 and all("verify --repair" in str(w.message) for w in rec)
    # the damaged entries are quarantined in this process: no new warnings
    assert store.nearest(q, **kw)[0].entry_id == intact
    with pytest.raises(CacheEntryError, match="SHA-256") as exc:
        store.get(flipped)
    assert exc.value.kind == "corrupted"
    _assert_states_equal(store.get(intact).state(5), _states(3)[5])

    report = store.verify()
    assert not report.clean and report.checked == 4 and report.ok == (intact,)
    assert {(pr.entry_id, pr.kind) for pr in report.problems} == {
        (flipped, "corrupted"),
        (truncated, "truncated"),
        (deleted, "missing"),
    }
    store.close()
    # a fresh process view: the damaged rows are still there until repaired; lookups skip them
    with DiskCacheStore(tmp_path / "c") as again:
        with pytest.warns(CacheWarning):
            assert again.nearest(q, **kw)[0].entry_id == intact
        assert again.verify(repair=True).repaired
        assert again.verify().clean and len(again) == 1
        assert sorted(f.name for f in again.blob_dir.iterdir()) == [f"{intact}.safetensors"]


def test_tampered_blob_metadata_is_detected(tmp_path):
    """A blob swapped for another valid entry's blob is a mismatch, not a silent wrong hit."""
    store, q, kw, (a, b, *_) = _damage_setup(tmp_path / "c")
    store.blob_path(a).write_bytes(store.blob_path(b).read_bytes())
    with sqlite3.connect(store.directory / "index.sqlite") as con:  # make size + sha agree
        con.execute(
            "UPDATE entries SET sha256 = (SELECT sha256 FROM entries WHERE id = ?), "
            "nbytes = (SELECT nbytes FROM entries WHERE id = ?) WHERE id = ?",
            (b, b, a),
        )
    con.close()
    with pytest.warns(CacheWarning, match="mismatch"):
        assert store.nearest(q, **kw)[0].entry_id == b
    store.close()


def test_unindexed_blobs_are_garbage_collected_on_open(tmp_path):
    with DiskCacheStore(tmp_path / "c") as store:
        keep = store.put("keep", np.ones(4), _states(0), model_id="tiny", config_hash=CFG)
        # a crash between the blob write and the index commit leaves these behind
        orphan = store.blob_dir / ("ab" * 16 + ".safetensors")
        orphan.write_bytes(store.blob_path(keep).read_bytes())
        tmp = store.blob_dir / f".{keep}.safetensors.x1y2.tmp"
        tmp.write_bytes(b"partial")
        foreign = store.blob_dir / "notes.txt"
        foreign.write_text("not ours")
    with DiskCacheStore(tmp_path / "c") as store:
        assert sorted(store.collected) == sorted([orphan.name, tmp.name, foreign.name])
        assert not orphan.exists() and not tmp.exists() and foreign.exists()
        report = store.verify()
        assert report.clean and report.orphans == ("notes.txt",) and len(store) == 1


def test_path_traversal_in_the_index_is_rejected(tmp_path):
    root = tmp_path / "c"
    store, q, kw, ids = _damage_setup(root)
    victim = tmp_path / "victim.safetensors"  # what blobs/../../victim.safetensors would name
    victim.write_bytes(store.blob_path(ids[0]).read_bytes())
    with sqlite3.connect(root / "index.sqlite") as con:
        row = con.execute("SELECT * FROM entries WHERE id = ?", (ids[0],)).fetchone()
        con.execute(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("../../victim", *row[1:7], np.asarray(q, "<f4").tobytes(), *row[8:]),
        )
        con.execute("INSERT INTO changes (op, entry_id) VALUES ('put', '../../victim')")
    con.close()
    with pytest.raises(CacheEntryError, match="invalid cache entry id"):
        store.blob_path("../../victim")
    with pytest.raises(CacheEntryError, match="invalid"):
        store.get("../../victim")
    with pytest.warns(CacheWarning, match="invalid_id"):
        assert store.nearest(q, **kw)[0].entry_id == ids[0]
    report = store.verify()
    assert [(p.entry_id, p.kind) for p in report.problems] == [("../../victim", "invalid_id")]
    store.verify(repair=True)
    assert victim.exists() and store.verify().clean and len(store) == 4
    store.clear()
    assert victim.exists()
    store.close()


# ---------------------------------------------------------------------------- processes
_WRITER = textwrap.dedent(
    """
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_cache import CFG, _states
    from rfmpc.cache import DiskCacheStore
    root, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    open(os.path.join(root, "ready." + tag), "w").close()
    deadline = time.time() + 120
    while len([f for f in os.listdir(root) if f.startswith("ready.")]) < 2:
        if time.time() > deadline:
            sys.exit("the other writer never started")
        time.sleep(0.01)
    with DiskCacheStore(os.path.join(root, "cache")) as store:
        for i in range(n):
            seed = (1 if tag == "a" else 2) * 1000 + i
            pooled = np.random.default_rng(seed).standard_normal(16)
            store.put(f"{{tag}}{{i}}", pooled, _states(seed, (2, 4)), model_id="tiny",
                      config_hash=CFG)
    """
)


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    watcher = DiskCacheStore(tmp_path / "cache")  # open before the writers: follows the log
    script = _WRITER.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), tag, "20"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for tag in ("a", "b")
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-3000:]
    with DiskCacheStore(tmp_path / "cache") as store:
        infos = store.ls()
        assert len(store) == 40
        assert sorted(i.prompt for i in infos) == sorted(
            [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)]
        )
        report = store.verify()
        assert report.clean and report.checked == 40 and report.orphans == ()
    # the store opened before the writers sees every entry through the change log
    for tag, mult in (("a", 1), ("b", 2)):
        pooled = np.random.default_rng(mult * 1000 + 7).standard_normal(16)
        entry, sim = watcher.nearest(pooled, model_id="tiny", config_hash=CFG)
        assert entry.prompt == f"{tag}7" and sim == pytest.approx(1.0, abs=1e-6)
        _assert_states_equal(entry.state(4), _states(mult * 1000 + 7, (2, 4))[4])
    watcher.close()


def test_two_handles_follow_each_others_writes(tmp_path):
    kw = dict(model_id="tiny", config_hash=CFG)
    with DiskCacheStore(tmp_path / "c") as a, DiskCacheStore(tmp_path / "c", max_entries=1) as b:
        e1 = a.put("one", np.ones(4), _states(1), **kw)
        assert b.nearest(np.ones(4), **kw)[0].entry_id == e1
        e2 = b.put("two", -np.ones(4), _states(2), **kw)  # evicts e1 (b's limit is 1)
        assert a.nearest(np.ones(4), **kw)[0].entry_id == e2  # no warning: e1 left cleanly
        assert a.problems == [] and len(a) == 1
        b.clear()
        assert a.nearest(np.ones(4), **kw) is None and len(a) == 0


def test_corrupt_index_is_a_clear_error(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "index.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="unreadable cache index"):
        DiskCacheStore(root)


# ---------------------------------------------------------------------------- CLI
def _cli(capsys, *argv):
    rc = main(["cache", *argv])
    return rc, capsys.readouterr().out


def test_cli_ls_verify_clear(tmp_path, capsys):
    root = tmp_path / "c"
    with DiskCacheStore(root) as store:
        a = store.put("a red square", np.ones(4), _states(1), model_id="tiny", config_hash=CFG)
        b = store.put("a blue disc", -np.ones(4), _states(2), model_id="tiny", config_hash=CFG)
    rc, out = _cli(capsys, "ls", "--cache", str(root), "--json")
    listing = json.loads(out)
    assert rc == 0 and listing["count"] == 2
    assert {e["entry_id"] for e in listing["entries"]} == {a, b}
    assert {tuple(e["steps"]) for e in listing["entries"]} == {(0, 3, 5)}
    rc, out = _cli(capsys, "ls", "--cache", str(root))
    assert rc == 0 and "a red square" in out and "2 entries" in out

    rc, out = _cli(capsys, "verify", "--cache", str(root), "--json")
    assert rc == 0 and json.loads(out)["clean"] and json.loads(out)["checked"] == 2

    blob = root / "blobs" / f"{a}.safetensors"
    blob.write_bytes(blob.read_bytes()[:-3])
    rc, out = _cli(capsys, "verify", "--cache", str(root), "--json")
    rep = json.loads(out)
    assert rc == 1 and not rep["clean"] and rep["ok"] == 1
    assert [(p["entry_id"], p["kind"]) for p in rep["problems"]] == [(a, "truncated")]
    rc, out = _cli(capsys, "verify", "--cache", str(root))
    assert rc == 1 and "truncated" in out and "--repair" in out
    rc, out = _cli(capsys, "verify", "--cache", str(root), "--repair", "--json")
    assert rc == 1 and json.loads(out)["repaired"]
    rc, out = _cli(capsys, "verify", "--cache", str(root), "--json")
    assert rc == 0 and json.loads(out)["checked"] == 1

    rc, out = _cli(capsys, "clear", "--cache", str(root), "--json")
    assert rc == 0 and json.loads(out)["removed"] == 1
    rc, out = _cli(capsys, "ls", "--cache", str(root), "--json")
    assert json.loads(out)["count"] == 0 and list((root / "blobs").iterdir()) == []

    assert main(["cache", "ls", "--cache", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()
    (tmp_path / "plain").mkdir()
    assert main(["cache", "verify", "--cache", str(tmp_path / "plain")]) == 2
    assert "not an rfmpc cache" in capsys.readouterr().err
    assert list((tmp_path / "plain").iterdir()) == []  # nothing created in a foreign dir
