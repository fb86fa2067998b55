"""``benchmarks/cpu_dots.py``: shapes parse or are refused with the fix; a run times both
compilations through ``Transformer.autotune`` and renders every row."""

from __future__ import annotations

import pytest

from benchmarks import cpu_dots


def test_shapes_parse_and_bad_ones_say_the_format():
    assert cpu_dots._shapes("2x32,1X16") == [(2, 32), (1, 16)]
    for bad in ("2x", "32", "0x32", "2x31"):
        with pytest.raises(SystemExit, match="--shapes"):
            cpu_dots._shapes(bad)


def test_run_times_every_candidate_and_renders():
    record = cpu_dots.run([(1, 8)], runs=1)
    (row,) = record["rows"]
    assert set(row["median_ms"]) == set(record["candidates"]) == set(cpu_dots.LABELS.values())
    assert all(t > 0 for t in row["median_ms"].values()) and row["failed"] == {}
    assert row["best"] in row["median_ms"] and row["best_speedup"] >= 1.0
    assert set(row["bit_identical_to_default"]) == set(row["median_ms"])
    md = cpu_dots.markdown(record)
    assert "| 1 x 8x8 |" in md and "load average" in md and "Eigen dots + YNN" in md
