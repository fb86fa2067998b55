"""Property test over prompt streams: whatever the order of puts, hits, repeats, evictions and
damage, every served image is finite and every provenance record agrees with the cache.

Hypothesis draws a stream of operations on one :class:`DiskCacheStore` with an LRU limit:
serve a batch of prompts (drawn from a small pool of related prompts, so repeats, hits and
misses all happen), damage a random blob on disk (a write cut short, a flipped byte) or close
and reopen the store (what a killed process leaves). After every call the records are checked
against the cache as it was before the call.
"""

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rfmpc.cache import CacheWarning, DiskCacheStore, ResumePolicy
from rfmpc.cached import CachedGenerator
from rfmpc.pipeline import load_pipeline

N = 4
# the serving band and the edit bands below it: every kind of hit, not only paraphrases
POLICY = ResumePolicy().with_lower_bands(ResumePolicy.edit_bands())
POOL = [
    "a red circle at the top left on a blue background",
    "red circle, large, top left; blue background",
    "a small red circle at the top left on a blue background",
    "a red square at the top left on a blue background",
    "a green triangle at the center on a white background",
    "an image of a green triangle in the center on a plain white background",
]

serve = st.tuples(
    st.just("serve"),
    st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3),
    st.integers(0, 2),
)
damage = st.tuples(st.just("damage"), st.sampled_from(["truncate", "flip"]), st.integers(0, 99))
reopen = st.tuples(st.just("reopen"), st.just(None), st.just(None))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(st.one_of(serve, serve, serve, damage, reopen), min_size=2, max_size=7))
def test_streams_keep_provenance_consistent(pipe, tmp_path_factory, ops):
    d = tmp_path_factory.mktemp("stream")
    store = DiskCacheStore(d, max_entries=5)
    served: dict[tuple[str, int], np.ndarray] = {}  # the last image served per (prompt, seed)
    try:
        for op, a, b in ops:
            if op == "reopen":
                store.close()
                store = DiskCacheStore(d, max_entries=5)
                continue
            if op == "damage":
                infos = store.ls()
                if infos:
                    blob = store.blob_path(infos[b % len(infos)].entry_id)
                    data = bytearray(blob.read_bytes())
                    if a == "truncate":
                        data = data[: len(data) // 2]
                    else:
                        data[len(data) // 2] ^= 0xFF
                    blob.write_bytes(bytes(data))
                continue
            gen = CachedGenerator(pipe, store, policy=POLICY, num_inference_steps=N)
            before = {i.entry_id: i for i in store.ls()}
            prompts = [POOL[i] for i in a]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CacheWarning)  # damaged entries are reported
                out = gen(prompts, seed=b)
            assert np.isfinite(out.images).all()
            assert len(out.records) == len(prompts)
            for p, rec, img in zip(prompts, out.records, out.latents):
                assert rec.prompt == p and rec.seed == b
                if rec.kind == "miss":
                    assert rec.nfe == N and rec.entry_id is None and rec.stored is not None
                    assert rec.stored in store  # the entry just written survives its own put
                elif rec.kind == "hit":
                    assert rec.entry_id in before, "a hit must come from the cache as it was"
                    assert rec.cached_prompt == before[rec.entry_id].prompt
                    assert rec.resume_step in before[rec.entry_id].steps
                    assert rec.similarity >= gen.policy.min_similarity
                    assert rec.nfe == N - rec.resume_step  # MPC with v_A from the entry
                else:
                    assert rec.kind == "repeat" and rec.nfe == 0
                    # a repeat returns what was served for this prompt and seed, bit for bit
                    np.testing.assert_array_equal(np.asarray(img), served[(p, b)])
                served[(p, b)] = np.asarray(img)
            assert len(store) <= 5
    finally:
        store.close()
