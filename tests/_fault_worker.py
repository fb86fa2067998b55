"""Child-process side of ``tests/test_faults.py``: writers that die by SIGKILL mid-write.

Imported by a ``multiprocessing`` forkserver (``set_forkserver_preload``) so every child starts
with the libraries already imported but no JAX backend (it is initialised after the fork, in
the child; JAX and a plain ``fork`` of an initialised process do not mix). Children are cheap:
tiny arrays, no model compiles (except :func:`train_child`).

A writer performs numbered operations ("seeds") on one kind of file, appending each finished
seed to ``ROOT/acks`` (one ``write`` per line, which a kill cannot tear), and dies either at a
*hook* (a patched function in the write path SIGKILLs the process at a chosen point of one
write) or on a *timer* (a random delay while it writes in a loop). Everything written is a
deterministic function of the seed, so the parent knows exactly what each file must hold.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import zlib
from pathlib import Path

import numpy as np

import rfmpc.cache.disk
import rfmpc.flow.state
import rfmpc.train  # noqa: F401

N_STEPS = 4
MODEL = "tiny"
CFG = "f" * 64  # a config hash: only equality matters here

#: kill points inside one atomic write (``rfmpc.io.atomic_write_bytes``)
WRITE_HOOKS = ("torn-write", "before-fsync", "before-rename", "after-rename", "after-dir-fsync")
#: extra kill points inside ``DiskCacheStore.put``
CACHE_HOOKS = (*WRITE_HOOKS, "before-index-commit", "after-index-commit")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- deterministic data
def sigmas() -> np.ndarray:
    return np.linspace(1.0, 0.0, N_STEPS + 1, dtype=np.float32)


def state_arrays(seed: int, step: int) -> dict[str, np.ndarray]:
    """The arrays of seed ``seed``'s state at ``step`` (what a reload must give back)."""
    rng = np.random.default_rng([seed, step])
    return {
        "x": rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
        "key": np.array([seed % 2**32, 77], np.uint32),
        "cond": rng.standard_normal((1, 3, 8)).astype(np.float32),
    }


def make_state(seed: int, step: int):
    from rfmpc.flow.state import TrajectoryState

    a = state_arrays(seed, step)
    return TrajectoryState(
        a["x"], step, sigmas(), a["key"], {"embeds": a["cond"]}, meta={"seed": seed}
    )


def pooled(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 999]).standard_normal(16).astype(np.float32)


def cache_steps(seed: int) -> tuple[int, ...]:
    return (1, 3) if seed % 2 else (2,)


def ckpt_trees(step: int) -> tuple[dict, dict, dict]:
    """Tiny (params, opt_state, ema) pytrees for checkpoint ``step``."""
    rng = np.random.default_rng([step, 5])

    def tree():
        return {
            "w": rng.standard_normal((16, 16)).astype(np.float32),
            "b": rng.standard_normal(16).astype(np.float32),
            "n": np.array(step, np.int32),
        }

    return tree(), {"mu": tree(), "nu": tree(), "count": np.array(step, np.int32)}, tree()


# ---------------------------------------------------------------------------- kill hooks
class _TornFile:
    """Wraps the temp file of an atomic write: writes part of the data, then dies."""

    def __init__(self, f):
        self._f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def write(self, data):
        mv = memoryview(data)
        self._f.write(mv[: random.randrange(len(mv) + 1)])
        self._f.flush()
        die()

    def __getattr__(self, name):
        return getattr(self._f, name)


def arm(hook: str) -> None:
    """Patch the write path so that the next write dies at ``hook``."""
    import rfmpc.cache.disk as disk

    if hook == "torn-write":
        real_fdopen = os.fdopen
        os.fdopen = lambda *a, **k: _TornFile(real_fdopen(*a, **k))
    elif hook in ("before-fsync", "after-dir-fsync"):
        real_fsync, calls = os.fsync, []

        def fsync(fd):
            calls.append(fd)
            if hook == "before-fsync":
                die()
            real_fsync(fd)
            if len(calls) == 2:  # the file's fsync, then the directory's
                die()

        os.fsync = fsync
    elif hook in ("before-rename", "after-rename"):
        real_replace = os.replace

        def replace(src, dst):
            if hook == "before-rename":
                die()
            real_replace(src, dst)
            die()

        os.replace = replace
    elif hook == "before-index-commit":
        real_log = disk.DiskCacheStore._log

        def log(self, conn, op, ids):
            real_log(self, conn, op, ids)
            die()  # the INSERT is done, the transaction is not committed

        disk.DiskCacheStore._log = log
    elif hook == "after-index-commit":
        disk.DiskCacheStore._evict = lambda self, keep=None: die()
    else:
        raise ValueError(f"unknown hook {hook!r}")


# ---------------------------------------------------------------------------- operations
def _cache_op(root: Path):
    from rfmpc.cache.disk import DiskCacheStore

    store = DiskCacheStore(root / "cache")

    def op(seed):
        states = {s: make_state(seed, s) for s in cache_steps(seed)}
        store.put(f"s{seed}", pooled(seed), states, model_id=MODEL, config_hash=CFG)

    return op


def _state_op(root: Path):
    def op(seed):
        st = make_state(seed, seed % (N_STEPS + 1))
        st.save(root / "states" / f"s{seed}.safetensors")
        st.save(root / "states" / "latest.safetensors")  # overwritten every time

    return op


def _ckpt_op(root: Path):
    from rfmpc.train import _save_checkpoint

    def op(seed):
        params, opt, ema = ckpt_trees(seed)
        _save_checkpoint(root / "run" / "checkpoint.safetensors", seed, params, opt, ema, {})

    return op


OPS = {"cache": _cache_op, "state": _state_op, "ckpt": _ckpt_op}


def writer(kind: str, root: str, first: int, n_ok: int, hook: str | None, seed: int) -> None:
    """Run ``n_ok`` acknowledged operations from seed ``first``, then die: at ``hook`` during
    the next one, or (``hook=None``) on a random timer while operating in a loop."""
    random.seed(seed)
    root = Path(root)
    ack = os.open(root / "acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    op = OPS[kind](root)
    if kind != "ckpt":  # checkpoints of numpy trees need no JAX backend; states do
        make_state(first, 0)  # initialise it before timing anything
    s, t0 = first, time.perf_counter()
    for _ in range(n_ok):
        op(s)
        os.write(ack, f"{s}\n".encode())
        s += 1
    per_op = (time.perf_counter() - t0) / max(n_ok, 1)
    if hook is None:
        threading.Timer(random.uniform(0.0, 2.0 * max(per_op, 0.005)), die).start()
    else:
        arm(hook)
    for _ in range(10_000):
        op(s)
        os.write(ack, f"{s}\n".encode())
        s += 1
    time.sleep(60)  # a hook that did not fire: the parent sees no SIGKILL and fails


# ---------------------------------------------------------------------------- concurrency
def concurrent_writer(root: str, tag: int, seeds: list[int], max_entries, start_at: float):
    """Put one entry per seed into ``ROOT/cache``; record ``id seed created`` lines to
    ``ROOT/puts.<tag>`` (``created`` from a recording clock: the entry's LRU stamp)."""
    from rfmpc.cache.disk import DiskCacheStore

    last = [0.0]

    def clock():
        last[0] = time.time()
        return last[0]

    root = Path(root)
    out = os.open(root / f"puts.{tag}", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with DiskCacheStore(root / "cache", max_entries=max_entries, clock=clock) as store:
        batch = [(s, {st: make_state(s, st) for st in cache_steps(s)}) for s in seeds]
        while time.time() < start_at:  # line the writers up so they really overlap
            time.sleep(0.001)
        for s, states in batch:
            eid = store.put(f"s{s}", pooled(s), states, model_id=MODEL, config_hash=CFG)
            os.write(out, f"{eid} {s} {last[0]!r}\n".encode())


# ---------------------------------------------------------------------------- training
class HashEncoder:
    """A prompt encoder that is the same in every process (``hash(str)`` is salted per
    process, so the test suite's fake encoder would differ between a child and its parent)."""

    seq_dim = 16
    pooled_dim = 8

    def encode(self, prompts):
        import jax.numpy as jnp

        seq, pool = [], []
        for p in prompts:
            rng = np.random.default_rng(zlib.crc32(p.encode()))
            seq.append(rng.standard_normal((6, self.seq_dim)).astype(np.float32))
            pool.append(rng.standard_normal(self.pooled_dim).astype(np.float32))
        return jnp.asarray(np.stack(seq)), jnp.asarray(np.stack(pool))


def train_child(out: str, cfg, kill_step: int, max_delay: float, seed: int) -> None:
    """Train; once step ``kill_step`` is logged, die after a random delay of up to
    ``max_delay`` step durations (mid-step, mid-log or mid-checkpoint)."""
    from rfmpc.train import train

    random.seed(seed)

    armed, last = [], [None]

    def on_log(rec):
        step_s, last[0] = (
            (rec["elapsed_s"] - last[0] if last[0] is not None else 0.0),
            rec["elapsed_s"],
        )
        if rec["step"] >= kill_step and not armed:  # >=: a resumed run may start past it
            # within the next ~max_delay steps: mid-step, mid-log or mid-checkpoint
            delay = random.uniform(0.0, max_delay * max(step_s, 0.001))
            armed.append(threading.Timer(delay, die))
            armed[0].start()

    train(out, cfg, encoder=HashEncoder(), progress=False, on_log=on_log)
    time.sleep(60)  # finished before the timer fired: the parent sees no SIGKILL
