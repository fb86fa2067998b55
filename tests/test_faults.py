"""Faults and concurrency: SIGKILL in the middle of writes, several processes on one cache,
and a training run killed and resumed.

Every kill is a real ``SIGKILL`` of a child process (from a patched function in the write path,
or from a random timer), forked from a ``forkserver`` that has the libraries imported but no JAX
backend. After each kill the parent checks that everything written before still loads bit for
bit, that the write in flight is either absent or complete, and that the debris a kill leaves
(temp files, unindexed blobs) is cleaned up and never breaks later use. The counts are printed
(``-s``) and recorded in ``$RFMPC_FAULT_REPORT`` (a JSON-lines file) when that is set.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

import _fault_worker as W
import jax
import numpy as np
import pytest

from rfmpc.cache import DiskCacheStore
from rfmpc.cli import main
from rfmpc.flow.state import TrajectoryState
from rfmpc.io import remove_stale_temp_files, stale_temp_files
from rfmpc.train import TrainConfig, load_checkpoint, train

CI_KILLS = 30  # per kind, in the default (CI) run
SOAK_KILLS = 200  # per kind, with -m slow


@pytest.fixture(scope="module")
def ctx():
    """A forkserver context whose server has imported the libraries (Python 3.11's forkserver
    ignores the parent's ``sys.path`` when preloading, hence ``PYTHONPATH`` while it starts)."""
    from multiprocessing import forkserver

    c = multiprocessing.get_context("forkserver")
    c.set_forkserver_preload(["rfmpc.cache.disk", "rfmpc.train", "_fault_worker"])
    old = os.environ.get("PYTHONPATH")
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = here + (os.pathsep + old if old else "")
    try:
        forkserver.ensure_running()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return c


def _record(**counts) -> None:
    print(f"\nFAULTS {json.dumps(counts)}", file=sys.stderr)
    path = os.environ.get("RFMPC_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(counts) + "\n")


def _run_child(ctx, target, *args, timeout: float = 120.0) -> int:
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        p.join()
        pytest.fail(f"child {target.__name__}{args} hung for {timeout} s")
    return p.exitcode


def _acks(root: Path) -> list[int]:
    path = root / "acks"
    if not path.is_file():
        return []
    return [int(line) for line in path.read_text().splitlines() if line]


def _same(got, want, what: str) -> None:
    got = np.asarray(got)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert got.tobytes() == want.tobytes(), f"{what}: bytes differ"


def _check_state(st: TrajectoryState, seed: int, step: int) -> None:
    want = W.state_arrays(seed, step)
    _same(st.x, want["x"], f"seed {seed} x")
    _same(jax.random.key_data(st.key), want["key"], f"seed {seed} key")
    _same(st.cond["embeds"], want["cond"], f"seed {seed} cond")
    _same(st.sigmas, W.sigmas(), f"seed {seed} sigmas")
    assert int(st.step) == step and st.metadata == {"seed": seed}


@dataclasses.dataclass
class Tally:
    """What one kind's campaign did: kills, acknowledged writes, in-flight writes that survived
    whole or vanished, debris cleaned, and acknowledged writes lost (must stay 0)."""

    kind: str
    kills: int = 0
    acked: int = 0
    inflight_complete: int = 0
    inflight_absent: int = 0
    debris_cleaned: int = 0
    lost: int = 0
    hooks: dict = dataclasses.field(default_factory=dict)
    last_done: int | None = None  # the seed of the last write known complete (overwrites)


def _counts(t: Tally) -> dict:
    d = dataclasses.asdict(t)
    del d["last_done"]
    return d


# ---------------------------------------------------------------------------- per-kind checks
def _check_cache(root: Path, acked: set[int], inflight: int, survivors: set[int], t: Tally):
    blobs = root / "cache" / "blobs"
    debris = [p.name for p in blobs.iterdir()] if blobs.is_dir() else []
    with DiskCacheStore(root / "cache", create=False) as store:
        t.debris_cleaned += len(store.collected)
        assert set(store.collected) <= set(debris)
        files = sorted(p.name for p in blobs.iterdir())
        assert not [f for f in files if f.endswith(".tmp")], files
        report = store.verify()  # every blob: size, SHA-256 (as recorded at put), checksums
        assert report.clean and report.orphans == (), report
        by_prompt = {i.prompt: i.entry_id for i in store.ls()}
        assert files == sorted(f"{e}.safetensors" for e in by_prompt.values())
        present = {int(p[1:]) for p in by_prompt}
        t.lost += len(acked - present)
        assert acked <= present, f"acknowledged puts lost: {sorted(acked - present)}"
        assert present <= acked | survivors | {inflight}, "an entry nobody wrote"
        fresh = [s for s in present if s not in survivors]  # not yet compared bit for bit
        for s in fresh:
            entry = store.get(by_prompt[f"s{s}"])
            assert entry.steps == W.cache_steps(s)
            _same(entry.pooled, W.pooled(s), f"seed {s} pooled")
            for step in entry.steps:
                _check_state(entry.state(step), s, step)
        survivors.update(present)
    return inflight in present


def _check_states(root: Path, acked: set[int], inflight: int, survivors: set[int], t: Tally):
    d = root / "states"
    for s in sorted(acked | survivors):  # every earlier file, every time
        _check_state(TrajectoryState.load(d / f"s{s}.safetensors"), s, s % (W.N_STEPS + 1))
    done = (d / f"s{inflight}.safetensors").exists()
    if done:
        _check_state(
            TrajectoryState.load(d / f"s{inflight}.safetensors"),
            inflight,
            inflight % (W.N_STEPS + 1),
        )
        survivors.add(inflight)
    latest = d / "latest.safetensors"
    if latest.exists():
        st = TrajectoryState.load(latest)
        seed = st.metadata["seed"]
        last = t.last_done
        assert seed in (last, inflight), f"latest holds seed {seed}, not {last} or {inflight}"
        _check_state(st, seed, seed % (W.N_STEPS + 1))
        t.last_done = seed
    names = [f"s{s}.safetensors" for s in survivors | acked]
    names += ["latest.safetensors"] if latest.exists() else []
    assert sorted(p.name for p in d.glob("*.safetensors")) == sorted(names)
    return done


def _check_ckpt(root: Path, acked: set[int], inflight: int, survivors: set[int], t: Tally):
    ckpt = root / "run" / "checkpoint.safetensors"
    last = t.last_done
    if not ckpt.exists():
        assert last is None, "the checkpoint vanished"
        return False
    like = W.ckpt_trees(0)
    step, params, opt, ema, _ = load_checkpoint(ckpt, *like)
    assert step in (last, inflight), f"checkpoint at step {step}, expected {last} or {inflight}"
    t.lost += int(last is not None and step < last)
    for got, want in zip((params, opt, ema), W.ckpt_trees(step)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            _same(g, w, f"checkpoint {step}")
    if step == inflight:
        survivors.add(inflight)
        t.last_done = inflight
    return step == inflight


CHECKS = {"cache": _check_cache, "state": _check_states, "ckpt": _check_ckpt}
HOOKS = {"cache": W.CACHE_HOOKS, "state": W.WRITE_HOOKS, "ckpt": W.WRITE_HOOKS}


def _campaign(ctx, kind: str, root: Path, kills: int, rng: random.Random) -> Tally:
    """``kills`` children, each killed mid-write (half at hooks, half on timers), each followed
    by the full check of what is on disk."""
    t = Tally(kind)
    first, acked, survivors = 0, set(), set()
    (root / "states").mkdir(parents=True, exist_ok=True)
    (root / "run").mkdir(parents=True, exist_ok=True)
    for i in range(kills):
        hook = rng.choice(HOOKS[kind]) if i % 2 == 0 else None
        n_ok = rng.randrange(3)
        (root / "acks").unlink(missing_ok=True)
        code = _run_child(ctx, W.writer, kind, str(root), first, n_ok, hook, rng.randrange(2**31))
        assert code == -signal.SIGKILL, f"{kind} writer (hook {hook}) exited with {code}"
        t.kills += 1
        t.hooks[hook or "timer"] = t.hooks.get(hook or "timer", 0) + 1
        new = _acks(root)
        assert new == list(range(first, first + len(new))) and len(new) >= n_ok
        acked |= set(new)
        if new:
            t.last_done = new[-1]
        t.acked += len(new)
        inflight = first + len(new)
        if kind != "cache":  # what a later run does (train() on start): remove the debris
            targets = [root / "states" / f"s{s}.safetensors" for s in range(first, inflight + 1)]
            targets += [
                root / "states" / "latest.safetensors",
                root / "run" / "checkpoint.safetensors",
            ]
            for target in targets:
                t.debris_cleaned += len(remove_stale_temp_files(target))
            leftover = [p.name for d in ("states", "run") for p in (root / d).iterdir()]
            assert not [n for n in leftover if n.endswith(".tmp")], leftover
        if CHECKS[kind](root, acked, inflight, survivors, t):
            t.inflight_complete += 1
        else:
            t.inflight_absent += 1
        first = inflight + 1
    assert t.lost == 0
    return t


def _final_cache_checks(root: Path, capsys) -> None:
    """The CLI agrees the cache is clean; later puts and lookups work on the battered cache."""
    capsys.readouterr()
    assert main(["cache", "verify", "--cache", str(root / "cache"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["clean"] and rep["orphans"] == [] and rep["collected_on_open"] == []
    with DiskCacheStore(root / "cache") as store:
        n = len(store)
        states = {s: W.make_state(10**6, s) for s in W.cache_steps(10**6)}
        eid = store.put("after", W.pooled(10**6), states, model_id=W.MODEL, config_hash=W.CFG)
        hit, sim = store.nearest(W.pooled(10**6), model_id=W.MODEL, config_hash=W.CFG)
        assert hit.entry_id == eid and sim == pytest.approx(1.0, abs=1e-6)
        assert len(store) == n + 1


@pytest.mark.parametrize("kind", ["cache", "state", "ckpt"])
def test_sigkill_mid_write_loses_nothing(ctx, tmp_path, kind, capsys):
    t0 = time.perf_counter()
    t = _campaign(ctx, kind, tmp_path, CI_KILLS, random.Random(f"ci-{kind}"))
    if kind == "cache":
        _final_cache_checks(tmp_path, capsys)
    assert t.kills == CI_KILLS and t.lost == 0
    assert t.acked > 0 and t.inflight_complete + t.inflight_absent == CI_KILLS
    with capsys.disabled():
        _record(**_counts(t), wall_s=round(time.perf_counter() - t0, 1), soak=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cache", "state", "ckpt"])
def test_sigkill_soak(ctx, tmp_path, kind, capsys):
    t0 = time.perf_counter()
    t = _campaign(ctx, kind, tmp_path, SOAK_KILLS, random.Random(f"soak-{kind}"))
    if kind == "cache":
        _final_cache_checks(tmp_path, capsys)
    assert t.kills == SOAK_KILLS and t.lost == 0
    with capsys.disabled():
        _record(**_counts(t), wall_s=round(time.perf_counter() - t0, 1), soak=True)


def test_stale_temp_files_are_only_ours(tmp_path):
    target = tmp_path / "checkpoint.safetensors"
    mine = [
        tmp_path / ".checkpoint.safetensors.a1b2c3.tmp",
        tmp_path / ".checkpoint.safetensors.x.tmp",
    ]
    others = [
        tmp_path / ".other.safetensors.a1b2c3.tmp",
        tmp_path / "checkpoint.safetensors.tmp",
        tmp_path / ".checkpoint.safetensors.a1b2c3.tmpx",
    ]
    for p in mine + others:
        p.write_bytes(b"x")
    link = tmp_path / ".checkpoint.safetensors.link.tmp"
    link.symlink_to(others[0])
    assert stale_temp_files(target) == sorted(mine)
    assert remove_stale_temp_files(target) == sorted(mine)
    assert all(p.exists() for p in others) and link.is_symlink() and stale_temp_files(target) == []


# ---------------------------------------------------------------------------- concurrency
def _writers(ctx, root: Path, plans: list[list[int]], max_entries, read=None):
    """Run one writer process per plan at once; ``read()`` is called in a loop meanwhile.
    Returns ``{entry id: (seed, created, writer)}``."""
    start_at = time.time() + 5.0  # all children forked and warmed up by then
    procs = [
        ctx.Process(target=W.concurrent_writer, args=(str(root), i, seeds, max_entries, start_at))
        for i, seeds in enumerate(plans)
    ]
    for p in procs:
        p.start()
    deadline = time.time() + 240
    while read is not None and any(p.is_alive() for p in procs) and time.time() < deadline:
        read()
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"
    puts = {}
    for i in range(len(plans)):
        for line in (root / f"puts.{i}").read_text().splitlines():
            eid, seed, created = line.split()
            puts[eid] = (int(seed), float(created), i)
    assert len(puts) == sum(len(p) for p in plans), "two puts returned the same id"
    return puts


def _put_order(root: Path) -> list[str]:
    """Entry ids in the order their puts were committed (the index's change log)."""
    con = sqlite3.connect(root / "cache" / "index.sqlite")
    rows = con.execute("SELECT entry_id FROM changes WHERE op = 'put' ORDER BY seq").fetchall()
    con.close()
    return [e for (e,) in rows]


def _interleavings(root: Path, puts) -> int:
    """How often consecutive puts in the index's change log come from different writers: the
    writers really overlapped only if this is well above the number of writers."""
    order = _put_order(root)
    return sum(puts[a][2] != puts[b][2] for a, b in itertools.pairwise(order))


def _check_entry(store, eid: str, seed: int) -> None:
    entry = store.get(eid)
    assert entry.prompt == f"s{seed}" and entry.steps == W.cache_steps(seed)
    _same(entry.pooled, W.pooled(seed), f"{eid} pooled")
    for step in entry.steps:
        _check_state(entry.state(step), seed, step)


def _index_matches_blobs(store) -> list[str]:
    ids = sorted(i.entry_id for i in store.ls())
    files = sorted(p.name for p in store.blob_dir.iterdir())
    assert files == [f"{e}.safetensors" for e in ids], "index and blobs disagree"
    report = store.verify()
    assert report.clean and report.orphans == () and sorted(report.ok) == ids
    return ids


def test_concurrent_writers_lose_nothing(ctx, tmp_path, capsys):
    """Three processes put 24 entries each into one cache at once, 8 of them the same content
    in all three (overlapping) and 16 their own, while this process reads: every put is there
    afterwards, bit for bit, and the index agrees with the blobs."""
    shared = list(range(8))
    plans = [shared + [100 * (w + 1) + i for i in range(16)] for w in range(3)]
    for p in plans:
        random.Random(len(p) + p[-1]).shuffle(p)
    watcher = DiskCacheStore(tmp_path / "cache")
    all_seeds = sorted({s for p in plans for s in p})
    reads = []

    def read():  # lookups from this process while the writers run: hits are whole and exact
        seed = random.choice(all_seeds)
        hit = watcher.nearest(W.pooled(seed), model_id=W.MODEL, config_hash=W.CFG)
        if hit is not None and hit[1] > 0.999999:
            _check_entry(watcher, hit[0].entry_id, seed)
            reads.append(seed)

    t0 = time.perf_counter()
    puts = _writers(ctx, tmp_path, plans, None, read)
    switches = _interleavings(tmp_path, puts)
    assert switches >= 10, f"the writers barely overlapped ({switches} switches)"
    with DiskCacheStore(tmp_path / "cache") as store:
        assert len(store) == 72
        assert _index_matches_blobs(store) == sorted(puts)
        for eid, (seed, _, _) in puts.items():
            _check_entry(store, eid, seed)
        by_content = {}
        for info in store.ls():
            by_content.setdefault(info.prompt, []).append(info.entry_id)
        assert all(len(by_content[f"s{s}"]) == 3 for s in range(8))  # overlapping: one each
    # a handle opened before the writers follows all of them through the change log
    hit, sim = watcher.nearest(W.pooled(101), model_id=W.MODEL, config_hash=W.CFG)
    assert hit.prompt == "s101" and sim == pytest.approx(1.0, abs=1e-6)
    watcher.close()
    assert reads, "no lookup hit while the writers ran"
    with capsys.disabled():
        _record(
            kind="concurrent-put",
            writers=3,
            puts=len(puts),
            lost=0,
            interleavings=switches,
            exact_reads_during_writes=len(reads),
            wall_s=round(time.perf_counter() - t0, 1),
        )


def _replay_lru(con: sqlite3.Connection, created: dict[str, float], k: int) -> int:
    """Replay the change log: after each put, the evictions logged must be exactly the
    least-recently-used entries (other than the one just put) beyond ``k``. Returns the number
    of evictions checked."""
    present: dict[str, float] = {}
    ops = con.execute("SELECT op, entry_id FROM changes ORDER BY seq").fetchall()
    i, checked = 0, 0
    while i < len(ops):
        op, eid = ops[i]
        assert op == "put", f"unexpected {op} {eid} at change {i}"
        present[eid] = created[eid]
        i += 1
        dels = set()
        while i < len(ops) and ops[i][0] == "del":
            dels.add(ops[i][1])
            i += 1
        others = sorted((t, e) for e, t in present.items() if e != eid)
        want = {e for _, e in others[: max(0, len(present) - k)]}
        assert dels == want, f"after put {eid}: evicted {sorted(dels)}, LRU says {sorted(want)}"
        for e in dels:
            del present[e]
        checked += len(dels)
    return checked


def test_concurrent_eviction_keeps_the_lru_invariant(ctx, tmp_path, capsys):
    """Three processes with ``max_entries=6`` put 20 entries each at once. Each eviction, in
    the order the log records them, removes exactly the least-recently-used entries beyond the
    limit, never the one just put; at the end the 6 last-committed entries remain, whole, and no
    blob is orphaned or missing."""
    k = 6
    plans = [[1000 * (w + 1) + i for i in range(20)] for w in range(3)]
    t0 = time.perf_counter()
    puts = _writers(ctx, tmp_path, plans, k)
    switches = _interleavings(tmp_path, puts)
    assert switches >= 10, f"the writers barely overlapped ({switches} switches)"
    created = {e: c for e, (_, c, _) in puts.items()}
    with DiskCacheStore(tmp_path / "cache") as store:
        ids = _index_matches_blobs(store)
        assert len(ids) == k
        for eid in ids:
            _check_entry(store, eid, puts[eid][0])
        con = sqlite3.connect(tmp_path / "cache" / "index.sqlite")
        evicted = _replay_lru(con, created, k)
        con.close()
    order = _put_order(tmp_path)
    # entries are stamped under the write lock, so LRU order is commit order: what survives is
    # exactly the last k puts committed, whichever process made them
    assert sorted(ids) == sorted(order[-k:])
    assert evicted == 60 - k
    writers_left = {puts[e][2] for e in ids}
    with capsys.disabled():
        _record(
            kind="concurrent-evict",
            writers=3,
            puts=60,
            limit=k,
            evictions=evicted,
            wrong_evictions=0,
            interleavings=switches,
            writers_with_survivors=len(writers_left),
            wall_s=round(time.perf_counter() - t0, 1),
        )


# ---------------------------------------------------------------------------- training
TINY = TrainConfig(
    steps=16,
    batch_size=2,
    num_layers=1,
    num_heads=2,
    head_dim=8,
    patch_size=8,
    checkpoint_every=2,
    log_every=1,
    warmup_steps=2,
    learning_rate=3e-3,
)


def _ckpt_tensors(run: Path) -> tuple[int, dict[str, np.ndarray]]:
    from rfmpc.io import load_safetensors

    tensors, header = load_safetensors(run / "checkpoint.safetensors")
    return int(header["step"]), tensors


def _kill_and_resume(ctx, tmp_path: Path, kill_steps: list[int], capsys) -> None:
    run = tmp_path / "killed"
    rng = random.Random(f"train-{kill_steps}")
    resumed_from = []
    for k in kill_steps:
        code = _run_child(
            ctx, W.train_child, str(run), TINY, k, 2.0, rng.randrange(2**31), timeout=600
        )
        assert code == -signal.SIGKILL, f"the training child exited with {code}"
        resumed_from.append(
            _ckpt_tensors(run)[0] if (run / "checkpoint.safetensors").exists() else 0
        )
    debris = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    done = train(run, TINY, encoder=W.HashEncoder(), progress=False)  # resume in this process
    assert done["finished"] and done["steps_done"] == TINY.steps
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "debris survived resume"
    full = train(tmp_path / "full", TINY, encoder=W.HashEncoder(), progress=False)
    assert full["finished"]
    step_a, a = _ckpt_tensors(tmp_path / "full")
    step_b, b = _ckpt_tensors(run)
    assert step_a == step_b == TINY.steps and a.keys() == b.keys()
    for name in a:  # params, EMA and optimizer state: bit for bit
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs after resume"
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, TINY.steps + 1))
    ref = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in ref]  # same losses, step by step
    with capsys.disabled():
        _record(
            kind="train-resume",
            kills=len(kill_steps),
            resumed_from=resumed_from,
            debris_cleaned=len(debris),
            tensors=len(a),
            bit_exact=True,
        )


@pytest.mark.slow
def test_killed_training_resumes_bit_exact(ctx, tmp_path, capsys):
    """(slow: two train-step compilations, ~40 s idle and minutes on a busy 2-core machine; CI
    covers checkpoint integrity under SIGKILL with the ``ckpt`` campaign, the in-process resume
    in test_train.py, and the log / debris repair below.)"""
    _kill_and_resume(ctx, tmp_path, [random.Random(0).randrange(3, 8)], capsys)


@pytest.mark.slow
def test_killed_training_resumes_bit_exact_after_repeated_kills(ctx, tmp_path, capsys):
    _kill_and_resume(ctx, tmp_path, [3, 7, 11], capsys)


def test_resume_repairs_the_log_a_kill_leaves(tmp_path):
    """A run killed after logging steps past its last checkpoint, mid-line, leaves records the
    resumed run would log again; resume keeps exactly the checkpointed ones (no compile)."""
    from rfmpc.train import _read_log

    log = tmp_path / "log.jsonl"
    recs = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')
    assert _read_log(log, 3) == recs[:3]
    assert _read_log(log, 10) == recs
    assert _read_log(tmp_path / "missing.jsonl", 3) == []
