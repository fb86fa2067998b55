"""CachedGenerator on the embedded model: misses, hits, exact repeats, batching, damage."""

import json
import warnings

import jax
import numpy as np
import pytest

from rfmpc.cache import CacheWarning, DiskCacheStore, MemoryCacheStore, ResumePolicy
from rfmpc.cached import CachedGenerator
from rfmpc.cli import main
from rfmpc.control import Direct
from rfmpc.pipeline import load_pipeline

N = 8
A = "a red circle at the top left on a blue background"
A_PARAPHRASE = "red circle, large, top left; blue background"
B = "a green square at the center on a white background"


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(None)


def test_miss_equals_the_pipeline_and_stores_what_a_hit_needs(pipe):
    store = MemoryCacheStore()
    gen = CachedGenerator(pipe, store, num_inference_steps=N)
    out = gen([A, B], seed=[3, 4])
    for i, (p, s) in enumerate(((A, 3), (B, 4))):
        rec = out.records[i]
        assert rec.kind == "miss" and rec.nfe == N and rec.batch == 2 and not rec.from_cache
        ref = pipe(p, seed=s, num_inference_steps=N).images
        np.testing.assert_array_equal(out.images[i : i + 1], ref)  # bit-identical
    assert gen.store_steps == (6,)  # the step the default policy picks at N = 8: floor(.8 N)
    entry = store.get(out.records[0].stored)
    assert entry.steps == (6,) and set(entry.extras) == {"final", "velocity/6"}
    bands = CachedGenerator(pipe, store, policy=ResumePolicy.edit_bands(), num_inference_steps=N)
    assert bands.store_steps == (1, 2, 3)  # every step the edit bands pick
    # the stored velocity (from consecutive states) is the model's velocity at the state
    st = entry.states[6]
    v = gen.field(st.x, st.sigmas[6], st.cond)
    np.testing.assert_allclose(entry.extras["velocity/6"], np.asarray(v), atol=2e-4)
    assert st.metadata["seed"] == 3 and int(jax.random.key_data(st.key)[-1]) == 3


def test_repeat_hit_and_provenance(pipe):
    store = MemoryCacheStore()
    gen = CachedGenerator(pipe, store, num_inference_steps=N)
    first = gen([A], seed=3)
    out = gen([A, A_PARAPHRASE, A], seed=[3, 7, 3])
    rep, hit, dup = out.records
    assert rep.kind == "repeat" and rep.nfe == 0 and rep.entry_id == first.records[0].stored
    np.testing.assert_array_equal(out.images[0], first.images[0])
    assert hit.kind == "hit" and hit.cached_prompt == A and hit.similarity > 0.95
    assert hit.resume_step == 6 and hit.nfe == N - 6 and hit.controller == "MPC"
    assert hit.seed == 7 and hit.seed_used == 3 and "seed 3" in hit.note
    assert dup.kind == "repeat" and dup.nfe == 0 and "image 0 of this call" in dup.note
    # the served hit is repeatable: same image, no model call
    again = gen([A_PARAPHRASE], seed=7)
    assert again.records[0].kind == "repeat" and again.records[0].nfe == 0
    np.testing.assert_array_equal(again.images[0], out.images[1])
    # a served hit never becomes a resumable entry: the next lookup still resumes from A
    assert all(
        e.prompt == A
        for e in (store.get(i.entry_id) for i in store.ls())
        if gen.config_hash == e.config_hash
    )


def test_settings_are_part_of_the_cache_key(pipe):
    store = MemoryCacheStore()
    CachedGenerator(pipe, store, num_inference_steps=N)([A], seed=3)
    other_g = CachedGenerator(pipe, store, num_inference_steps=N, guidance_scale=2.0)
    assert other_g([A_PARAPHRASE], seed=3).records[0].kind == "miss"
    other_n = CachedGenerator(pipe, store, num_inference_steps=N + 2)
    assert other_n([A_PARAPHRASE], seed=3).records[0].kind == "miss"
    strict = CachedGenerator(
        pipe, store, Direct(), ResumePolicy().with_min_similarity(0.999), num_inference_steps=N
    )
    assert strict([A_PARAPHRASE], seed=3).records[0].kind == "miss"


def test_damaged_entry_is_skipped_and_the_prompt_generated(pipe, tmp_path):
    with DiskCacheStore(tmp_path / "c") as store:
        gen = CachedGenerator(pipe, store, num_inference_steps=N)
        eid = gen([A], seed=3).records[0].stored
        blob = store.blob_path(eid)
        blob.write_bytes(blob.read_bytes()[:-40])  # truncated
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = gen([A_PARAPHRASE], seed=3)
        rec = out.records[0]
        assert rec.kind == "miss" and rec.nfe == N and eid in rec.note
        assert any(issubclass(w.category, CacheWarning) for w in caught)
        assert store.problems and store.problems[0].entry_id == eid


def test_cli_generate_with_cache(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    argv = [
        "generate",
        "--prompt",
        A,
        "--prompt",
        B,
        "--steps",
        str(N),
        "--seed",
        "3",
        "--cache",
        cache,
        "--out",
        str(tmp_path / "x.png"),
        "--json",
    ]
    assert main(argv) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert [r["kind"] for r in lines] == ["miss", "miss"]
    keys = {
        "prompt",
        "seed_used",
        "steps",
        "from_cache",
        "cached_prompt",
        "similarity",
        "resume_step",
        "nfe",
        "wall_s",
        "controller",
        "fallback",
        "out",
    }
    assert keys <= set(lines[0])
    assert (tmp_path / "x-0.png").stat().st_size > 0
    assert (tmp_path / "x-0.png").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert (
        main(
            [
                "generate",
                "--prompt",
                A_PARAPHRASE,
                "--steps",
                str(N),
                "--seed",
                "5",
                "--cache",
                cache,
                "--controller",
                "direct",
                "--json",
            ]
        )
        == 0
    )
    hit = json.loads(capsys.readouterr().out)
    assert hit["kind"] == "hit" and hit["from_cache"] and hit["controller"] == "Direct"
    assert hit["cached_prompt"] == A and hit["seed_used"] == 3 and hit["nfe"] == N - 6
    # below the threshold: from scratch, said so, no error
    assert (
        main(
            [
                "generate",
                "--prompt",
                A_PARAPHRASE,
                "--steps",
                str(N),
                "--seed",
                "6",
                "--cache",
                cache,
                "--min-similarity",
                "0.9999",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["kind"] == "miss"


def _umask() -> int:
    from rfmpc.io import _umask

    return _umask()
