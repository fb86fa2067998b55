"""Property tests (hypothesis): the schedule, bit-exact resume, operator adjoints, the cache.

Reproducible in CI: every test runs under a derandomized, database-free profile with modest
example counts (the file takes well under a minute on 2 CPU cores); shapes that would recompile
a JAX program are drawn from small sets.
"""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rfmpc.cache import DiskCacheStore, MemoryCacheStore
from rfmpc.cache.entry import CacheEntryError, validate_entry_id
from rfmpc.cache.index import SimilarityIndex
from rfmpc.flow import TrajectoryState, flowmatch_sigmas, integrate
from rfmpc.inverse import (
    AveragePool,
    GaussianBlur,
    Identity,
    MatrixOperator,
    SaturatedBlur,
    box_inpainting,
    random_inpainting,
)

settings.register_profile(
    "rfmpc-properties",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile("rfmpc-properties")


def examples(n: int):
    return settings(PROFILE, max_examples=n)


# ---------------------------------------------------------------------------- schedule
shifts = st.floats(0.05, 20.0, allow_nan=False, allow_infinity=False)


@examples(80)
@given(n=st.integers(1, 300), shift=shifts)
def test_schedule_shape_order_and_range(n, shift):
    """Found by this test: diffusers' double shift of sigma = 1 rounds above 1 for small shifts
    (0.443 -> 1.0000002, 0.054 -> 1.0000066), which the grid used to copy; it is clipped now."""
    s = np.asarray(flowmatch_sigmas(n, shift))
    assert s.shape == (n + 1,) and s.dtype == np.float32
    assert s[0] <= 1.0 and s[-1] == 0.0
    assert np.all((s >= 0) & (s <= 1))
    assert np.all(np.diff(s) < 0), np.diff(s)


@examples(40)
@given(n=st.integers(2, 300))
def test_schedule_shift_one_is_linear(n):
    s = np.asarray(flowmatch_sigmas(n, 1.0), np.float64)
    assert s[0] == 1.0
    step = np.diff(s[:-1])  # the trailing 0 is appended, not on the line
    np.testing.assert_allclose(step, np.full_like(step, (1e-3 - 1.0) / (n - 1)), rtol=0, atol=1e-6)


@examples(20)
@given(n=st.integers(1, 200), shift=shifts)
def test_schedule_equals_diffusers(n, shift):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(n)
    ref = np.minimum(sch.sigmas.numpy(), 1.0)  # diffusers can round above 1; we clip
    np.testing.assert_allclose(np.asarray(flowmatch_sigmas(n, shift)), ref, rtol=0, atol=1e-7)
    if sch.sigmas.numpy()[0] <= 1.0:
        assert np.asarray(flowmatch_sigmas(n, shift)).tobytes() == ref.tobytes()


# ---------------------------------------------------------------------------- resume
def _field(x, sigma, cond):
    return jnp.tanh(x * cond) - sigma * x


_X_SHAPE = (2, 3)


@examples(6)
@given(
    shift=st.floats(0.3, 6.0),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(-3.0, 3.0, allow_nan=False),
)
def test_resume_is_bit_exact(shift, seed, scale):
    """0..k then k..N equals 0..N bit for bit, for every split k of a 3-step grid; examples vary
    the grid (shift), the latent and the field, which are traced: the 2 N + 1 solves compile
    once for the whole test."""
    n = 3
    sig = flowmatch_sigmas(n, shift)
    x = jax.random.normal(jax.random.key(seed), _X_SHAPE)
    start = TrajectoryState(x, 0, sig, cond=jnp.float32(scale))
    whole = np.asarray(integrate(_field, start).x).tobytes()
    for k in range(n + 1):
        mid = integrate(_field, start, stop=k)
        assert int(mid.step) == k
        resumed = integrate(_field, mid)
        assert int(resumed.step) == n
        assert np.asarray(resumed.x).tobytes() == whole, k


# ---------------------------------------------------------------------------- adjoints
def _dot(a, b) -> float:
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def _check_adjoint(op, x, y):
    ax, aty = op(x), op.adjoint(y)
    assert ax.shape == y.shape and aty.shape == x.shape
    lhs, rhs = _dot(ax, y), _dot(x, aty)
    scale = float(np.linalg.norm(np.asarray(x)) * np.linalg.norm(np.asarray(y))) + 1e-12
    assert abs(lhs - rhs) <= 1e-5 * scale, (lhs, rhs)


sizes = st.sampled_from([4, 8])


def _images(seed, shape):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@examples(12)
@given(
    h=sizes,
    w=sizes,
    c=st.sampled_from([1, 3]),
    missing=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_inpainting_adjoint(h, w, c, missing, seed):
    op = random_inpainting(jax.random.key(seed), (h, w), missing)
    _check_adjoint(op, _images(seed, (2, h, w, c)), _images(seed + 1, (2, h, w, c)))


@examples(12)
@given(h=sizes, w=sizes, data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_box_inpainting_adjoint(h, w, data, seed):
    top, left = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    bh, bw = data.draw(st.integers(1, h - top)), data.draw(st.integers(1, w - left))
    op = box_inpainting((h, w), (top, left, bh, bw))
    _check_adjoint(op, _images(seed, (1, h, w, 3)), _images(seed + 1, (1, h, w, 3)))


@examples(12)
@given(
    h=sizes,
    w=sizes,
    kernel=st.sampled_from([1, 3, 5, 9, 15]),
    blur=st.floats(0.2, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gaussian_blur_adjoint(h, w, kernel, blur, seed):
    op = GaussianBlur((h, w), kernel, blur)
    _check_adjoint(op, _images(seed, (2, h, w, 3)), _images(seed + 1, (2, h, w, 3)))


@examples(12)
@given(
    f=st.sampled_from([1, 2, 4]),
    m=st.integers(1, 3),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_average_pool_adjoint(f, m, n, seed):
    op = AveragePool(f)
    x = _images(seed, (2, f * m * 2, f * n * 2, 3))
    _check_adjoint(op, x, _images(seed + 1, op(x).shape))


@examples(12)
@given(m=st.integers(1, 12), d=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_matrix_and_identity_adjoint(m, d, seed):
    op = MatrixOperator(_images(seed, (m, d)))
    _check_adjoint(op, _images(seed + 1, (3, d)), _images(seed + 2, (3, m)))
    _check_adjoint(Identity(), _images(seed, (1, 4, 4, 2)), _images(seed + 3, (1, 4, 4, 2)))


def test_nonlinear_operator_has_no_adjoint():
    op = SaturatedBlur(GaussianBlur((4, 4)), 2.0)
    with pytest.raises(TypeError, match="not linear"):
        op.adjoint(jnp.zeros((1, 4, 4, 1)))


# ---------------------------------------------------------------------------- cache
_SIG = flowmatch_sigmas(6)
_CFG = "cfg"
prompts = st.text(max_size=40)
dims = st.integers(1, 24)
dtypes = st.sampled_from([np.float32, np.float16, jnp.bfloat16])


def _embedding(seed, d):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(d).astype(np.float32)
    v[0] = v[0] if v[0] != 0 else 1.0  # cosine similarity needs a non-zero vector
    return v


def _states(seed, steps, shape, dtype):
    rng = np.random.default_rng(seed)
    key = jax.random.wrap_key_data(np.array([seed % 2**32, 7], np.uint32))
    cond = {"emb": rng.standard_normal((1, 3)).astype(np.float32), "i": np.int32(seed % 1000)}
    out = {}
    for s in steps:
        x = np.asarray(rng.standard_normal(shape), dtype)
        out[s] = TrajectoryState(x, s, _SIG, key, cond, meta={"s": s})
    return out


def _bytes(a) -> bytes:
    return np.asarray(a).tobytes()


def _same_state(a: TrajectoryState, b: TrajectoryState):
    assert np.asarray(a.x).dtype == np.asarray(b.x).dtype and _bytes(a.x) == _bytes(b.x)
    assert int(a.step) == int(b.step) and _bytes(a.sigmas) == _bytes(b.sigmas)
    assert _bytes(jax.random.key_data(a.key)) == _bytes(jax.random.key_data(b.key))
    la, ta = jax.tree_util.tree_flatten(a.cond)
    lb, tb = jax.tree_util.tree_flatten(b.cond)
    assert ta == tb and all(_bytes(p) == _bytes(q) for p, q in zip(la, lb, strict=True))
    assert a.meta == b.meta


def _stores():
    """A memory store and a disk store in a fresh temporary directory (closed by the caller)."""
    tmp = tempfile.TemporaryDirectory()
    return tmp, [MemoryCacheStore(), DiskCacheStore(Path(tmp.name) / "c")]


@examples(15)
@given(
    prompt=prompts,
    d=dims,
    steps=st.sets(st.integers(0, 6), min_size=1, max_size=4),
    shape=st.sampled_from([(1, 2, 2, 3), (2, 4), (1, 1, 1, 1)]),
    dtype=dtypes,
    seed=st.integers(0, 2**40),
)
def test_cache_round_trip_is_bit_exact(prompt, d, steps, shape, dtype, seed):
    pooled = _embedding(seed, d)
    states = _states(seed, sorted(steps), shape, dtype)
    tmp, stores = _stores()
    try:
        for store in stores:
            eid = store.put(prompt, pooled, states, model_id="m", config_hash=_CFG)
            entry = store.get(eid)
            assert entry.prompt == prompt and entry.steps == tuple(sorted(steps))
            assert entry.pooled.dtype == np.float32 and _bytes(entry.pooled) == _bytes(pooled)
            for s in steps:
                _same_state(entry.state(s), states[s])
    finally:
        stores[1].close()
        tmp.cleanup()


@examples(20)
@given(
    n=st.integers(1, 25),
    d=st.integers(2, 16),
    seed=st.integers(0, 2**40),
)
def test_cache_nearest_is_the_true_argmax(n, d, seed):
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    vecs[np.linalg.norm(vecs, axis=1) == 0, 0] = 1.0
    q = rng.standard_normal(d).astype(np.float32)
    q[0] = q[0] or 1.0
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = unit.astype(np.float64) @ (q / np.linalg.norm(q)).astype(np.float64)
    tmp, stores = _stores()
    state = {0: TrajectoryState(np.zeros((1, 2), np.float32), 0, _SIG)}
    try:
        for store in stores:
            ids = [
                store.put(f"p{i}", v, state, model_id="m", config_hash=_CFG)
                for i, v in enumerate(vecs)
            ]
            # an exact copy of the query under another model must be ignored
            store.put("other", q, state, model_id="other", config_hash=_CFG)
            entry, sim = store.nearest(q, model_id="m", config_hash=_CFG)
            best = float(cos.max())
            assert sim == pytest.approx(best, abs=1e-5)
            assert cos[ids.index(entry.entry_id)] == pytest.approx(best, abs=1e-5)
    finally:
        stores[1].close()
        tmp.cleanup()


@examples(15)
@given(
    n=st.integers(1, 300),
    d=st.sampled_from([8, 40]),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**40),
)
def test_similarity_index_with_pruning_equals_brute_force(n, d, k, seed):
    """The low-rank pruning sketch (forced on for small sizes) never changes the answer."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.1, 10, (n, 1))
    vecs = vecs.astype(np.float32)
    q = rng.standard_normal(d).astype(np.float32)
    idx = SimilarityIndex(project_above_dim=4, min_rows_to_project=8, seed=seed % 1000)
    ids = [f"{i:032x}" for i in range(n)]
    idx.add_many(ids, vecs, model_id="m", config_hash=_CFG)
    got = idx.nearest(q, model_id="m", config_hash=_CFG, k=k)
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = unit.astype(np.float64) @ (q / np.linalg.norm(q)).astype(np.float64)
    want = np.sort(cos)[::-1][: min(k, n)]
    assert len(got) == min(k, n)
    np.testing.assert_allclose([s for _, s in got], want, atol=1e-5)
    for eid, s in got:
        assert cos[ids.index(eid)] == pytest.approx(s, abs=1e-5)


@examples(10)
@given(
    limit=st.integers(1, 4),
    puts=st.integers(1, 8),
    by_bytes=st.booleans(),
    seed=st.integers(0, 2**40),
)
def test_cache_eviction_never_exceeds_the_limit(limit, puts, by_bytes, seed):
    """After every put: within the limit, the newest entry kept, and the kept entries are the
    most recent ones (LRU: no lookups here, so recency is insertion order). An entry is ~700
    bytes, so ``max_bytes = 1000 * limit`` holds between ``limit`` and ``1.4 limit`` of them."""
    rng = np.random.default_rng(seed)
    tmp = tempfile.TemporaryDirectory()
    kw = {"max_bytes": 1000 * limit} if by_bytes else {"max_entries": limit}
    stores = [MemoryCacheStore(**kw), DiskCacheStore(Path(tmp.name) / "c", **kw)]
    try:
        for store in stores:
            ids = []
            for i in range(puts):
                x = rng.standard_normal((1, 4)).astype(np.float32)
                state = {0: TrajectoryState(x, 0, _SIG)}
                pooled = rng.standard_normal(4) + 5.0
                ids.append(store.put(f"p{i}", pooled, state, model_id="m", config_hash=_CFG))
                if by_bytes:
                    assert store.total_bytes() <= 1000 * limit
                else:
                    assert len(store) == min(limit, i + 1)
                kept = {info.entry_id for info in store.ls()}
                assert kept == set(ids[len(ids) - len(kept) :]) and ids[-1] in kept
    finally:
        stores[1].close()
        tmp.cleanup()


_ADVERSARIAL = [
    "../../etc/passwd",
    "..",
    "/abs/path",
    "a" * 32 + "/../x",
    "A" * 32,
    "0" * 31,
    "0" * 33,
    "%2e%2e%2f" + "0" * 23,
    "0" * 31 + "\x00",
    "0" * 16 + "\\" + "0" * 15,
]


@pytest.fixture(scope="module")
def disk_store(tmp_path_factory):
    store = DiskCacheStore(tmp_path_factory.mktemp("ids") / "c")
    yield store
    store.close()


@examples(60)
@given(
    entry_id=st.one_of(
        st.text(max_size=40),
        st.sampled_from(_ADVERSARIAL),
        st.from_regex(r"\A[0-9a-f]{32}\Z"),
        st.from_regex(r"\A[0-9a-fA-F./\\]{30,34}\Z"),
    )
)
def test_an_id_never_maps_outside_the_cache(disk_store, entry_id):
    root = disk_store.blob_dir.resolve()
    try:
        validate_entry_id(entry_id)
        valid = True
    except CacheEntryError:
        valid = False
    if not valid:
        with pytest.raises(CacheEntryError):
            disk_store.blob_path(entry_id)
        with pytest.raises((CacheEntryError, KeyError)):
            disk_store.get(entry_id)
        return
    path = disk_store.blob_path(entry_id).resolve()
    assert path.parent == root and entry_id in path.name
