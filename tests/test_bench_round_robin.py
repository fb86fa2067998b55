"""``mmdit_speed``'s round-robin protocol: each turn opens with untimed settling calls for
``--settle`` seconds (at least one), then the timed calls; the settling calls never count."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import mmdit_speed

ROOT = Path(__file__).resolve().parents[1]

# A fake engine: a call sleeps 300 ms when it is the first of a turn (after an idle gap longer
# than 250 ms), 2 ms otherwise -- the cold-first-call pattern the settling absorbs. The gaps
# are long so that a loaded CI machine descheduling the worker does not fake a cold call.
FAKE = textwrap.dedent(
    """
    import time
    from benchmarks import _bench_worker

    last = [time.perf_counter()]

    def fn():
        gap = time.perf_counter() - last[0]
        time.sleep(0.3 if gap > 0.25 else 0.002)
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
    time.sleep(0.4)  # both idle long enough that each one's first turn opens cold
    try:
        times, first = mmdit_speed._round_robin(workers, 2, 3, pause_s=0.4, settle_s=0.01)
        assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}
        # every timed call is warm; every turn's first (settling) call was cold
        assert all(t < 0.25 for v in times.values() for t in v), times
        assert {k: len(v) for k, v in first.items()} == {"a": 2, "b": 2}
        assert all(t >= 0.3 for v in first.values() for t in v), first

        # without settling the cold call is timed, once per turn
        times, first = mmdit_speed._round_robin(workers, 2, 3, pause_s=0.4, settle_s=0.0)
        assert first == {"a": [], "b": []}
        assert sum(t >= 0.3 for t in times["a"]) == 2, times
    finally:
        for w in workers.values():
            w.close()


def test_paired_ratio_cancels_a_slow_round_and_brackets_its_median():
    ref = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 1.0, 1.1, 0.9, 1.0, 1.0, 1.0]  # round 2 is slow for both
    eng = [1.2 * t for t in ref]
    r = mmdit_speed.paired_ratio(eng, ref, per_turn=3)
    assert r["rounds"] == 4 and r["median"] == pytest.approx(1.2)
    assert r["ci95"][0] == pytest.approx(1.2) and r["ci95"][1] == pytest.approx(1.2)
    noisy = mmdit_speed.paired_ratio([1.0, 2.0, 1.5, 1.1], [1.0] * 4, per_turn=1)
    assert noisy["ci95"][0] <= noisy["median"] <= noisy["ci95"][1]
    with pytest.raises(ValueError, match=">= 2 rounds"):
        mmdit_speed.paired_ratio([1.0, 1.0], [1.0, 1.0], per_turn=2)
