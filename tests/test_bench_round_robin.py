"""``mmdit_speed``'s round-robin protocol: each turn opens with untimed settling calls for
``--settle`` seconds (at least one), then the timed calls; the settling calls never count."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from benchmarks import mmdit_speed

ROOT = Path(__file__).resolve().parents[1]

# A fake engine: call i sleeps 30 ms when it is the first of a turn (after an idle gap
# longer than 20 ms), 2 ms otherwise -- the cold-first-call pattern the settling absorbs.
FAKE = textwrap.dedent(
    """
    import time
    from benchmarks import _bench_worker

    last = [time.perf_counter()]

    def fn():
        gap = time.perf_counter() - last[0]
        time.sleep(0.03 if gap > 0.02 else 0.002)
        last[0] = time.perf_counter()

    raise SystemExit(_bench_worker.serve(fn, lambda x: x, {"threads": 1}, None, 0.0))
    """
)


def _worker(label: str) -> mmdit_speed._Worker:
    w = mmdit_speed._Worker(label, [sys.executable, "-c", FAKE], {"PYTHONPATH": str(ROOT)}, None)
    info = w.read()
    assert info["threads"] == 1 and info["warmup_s"] >= 0
    return w


def test_settling_calls_are_untimed_and_absorb_the_cold_call():
    workers = {"a": _worker("a"), "b": _worker("b")}
    try:
        times, first = mmdit_speed._round_robin(workers, 2, 3, pause_s=0.05, settle_s=0.01)
        assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}
        # every timed call is warm; every turn's first (settling) call was cold
        assert all(t < 0.02 for v in times.values() for t in v), times
        assert {k: len(v) for k, v in first.items()} == {"a": 2, "b": 2}
        assert all(t >= 0.03 for v in first.values() for t in v), first

        # without settling the cold call is timed, once per turn
        times, first = mmdit_speed._round_robin(workers, 2, 3, pause_s=0.05, settle_s=0.0)
        assert first == {"a": [], "b": []}
        assert sum(t >= 0.03 for t in times["a"]) == 2, times
    finally:
        for w in workers.values():
            w.close()
