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


def test_run_times_both_candidates_and_renders():
    record = cpu_dots.run([(1, 8)], runs=1)
    (row,) = record["rows"]
    assert row["default_ms"] > 0 and row["eigen_ms"] > 0 and row["failed"] == {}
    assert row["eigen_speedup"] == pytest.approx(row["default_ms"] / row["eigen_ms"])
    md = cpu_dots.markdown(record)
    assert "| 1 x 8x8 |" in md and "load average" in md
