"""``benchmarks/`` is a package: every benchmark imports as ``benchmarks.<name>`` with no work
done at import, none juggles ``sys.path``, and the old ``python benchmarks/<name>.py`` form
still starts (re-executed as ``python -m benchmarks.<name>`` by ``benchmarks/_as_module.py``)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NAMES = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")


def test_no_sys_path_juggling():
    offenders = [p.name for p in BENCH.glob("*.py") if "sys.path.insert" in p.read_text()]
    assert offenders == []


def test_siblings_imported_through_the_package():
    """``import pipeline_speed`` (a bare sibling name) only works with benchmarks/ on sys.path,
    which ``python -m benchmarks.X`` does not give: every import of a sibling, module level or
    inside a function (worker code paths the import test does not reach), names the package."""
    import ast

    siblings = set(NAMES) - {"_as_module"}  # the bootstrap is imported by its bare name on purpose
    offenders = []
    for p in BENCH.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            offenders += [f"{p.name}:{node.lineno} {n}" for n in names if n in siblings]
    assert offenders == []


@pytest.mark.parametrize("name", NAMES)
def test_imports_without_work(name, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"benchmarks.{name} started a process at import")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "execve", refuse)
    results = BENCH / "results"
    before = sorted(results.iterdir()) if results.is_dir() else []
    mod = importlib.import_module(f"benchmarks.{name}")
    assert mod.__name__ == f"benchmarks.{name}"
    assert (sorted(results.iterdir()) if results.is_dir() else []) == before


def test_registries_agree():
    from rfmpc.cli.switch import CONTROLLERS

    report = importlib.import_module("benchmarks.report")
    sq = importlib.import_module("benchmarks.switch_quality")
    assert set(report.QUICK_SWITCH_METHODS) <= set(report.SWITCH_METHODS) == set(CONTROLLERS)
    assert set(CONTROLLERS) <= {label for label, _ in sq.controllers()}


def test_md_table_and_timing():
    from benchmarks._common import md_table, time_calls

    assert md_table(("a", "b"), [[1, 2], ["x"]]) == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
        "| x |  |",
    ]
    stats, out = time_calls(lambda: 3, 2, lambda o: o)
    assert out == 3 and stats["n"] == 2 and stats["min_s"] <= stats["median_s"]
    assert {"warmup_s", "times_s"} <= set(stats)


@pytest.mark.parametrize("form", ["file", "module"])
def test_both_command_forms_start(form):
    """``python benchmarks/x.py`` from elsewhere with nothing on PYTHONPATH (the bootstrap
    supplies the root), and ``python -m benchmarks.x`` from the root."""
    args = ["--n", "200", "--dims", "8", "--queries", "3", "--json"]
    if form == "file":
        cmd, cwd = [sys.executable, str(BENCH / "cache_lookup.py")], ROOT / "tests"
        env = dict(os.environ, PYTHONPATH="")
    else:
        cmd, cwd = [sys.executable, "-m", "benchmarks.cache_lookup"], ROOT
        env = dict(os.environ)
    out = subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"n": 200' in out.stdout


def test_save_result_never_replaces_a_result(tmp_path):
    from benchmarks._common import save_result

    first = save_result(tmp_path / "2026-01-01-cpu-x", {".md": "one\n", ".json": "{}"})
    second = save_result(tmp_path / "2026-01-01-cpu-x", {".md": "two\n", ".json": "[]"})
    assert first.name == "2026-01-01-cpu-x" and second.name == "2026-01-01-cpu-x-2"
    assert (tmp_path / "2026-01-01-cpu-x.md").read_text() == "one\n"
    assert (tmp_path / "2026-01-01-cpu-x-2.md").read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "2026-01-01-cpu-x-2.json",
        "2026-01-01-cpu-x-2.md",
        "2026-01-01-cpu-x.json",
        "2026-01-01-cpu-x.md",
    ]  # no temporary files left behind
