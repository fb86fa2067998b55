"""Smoke test of benchmarks/report.py's derived numbers, markdown and files.

Every number here is fabricated for the test and never leaves it; nothing is timed.
"""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.fixture(scope="module")
def report():
    return importlib.import_module("benchmarks.report")


def _row(engine, median, **kw):
    return {
        "engine": engine,
        "median_s": median,
        "min_s": median,
        "compile_s": 1.0,
        "compile_method": "aot",
        "memory": {"bytes": 2**20, "kind": "k"},
        "loadavg_1min": [1.0, 1.0],
        **kw,
    }


def _fabricated(platform="cpu", kind="cpu"):
    return {
        "date": "2000-01-02T03:04:05+00:00",
        "config": "cpu",
        "quick": False,
        "cpus": 2,
        "peak": {
            "platform": platform,
            "device_kind": kind,
            "cpu_model": "Test CPU",
            "cpus": 2,
            "datasheet_bf16_flops": 1e15 if platform == "gpu" else None,
            "gemm": {"float32": {"n": 8, "best_s": 1.0, "flops_per_s": 1e9}},
        },
        "sections": {
            "mmdit": [
                _row("diffusers", 0.4, case="small", dtype="fp32", flops=1e8),
                {
                    "case": "small",
                    "engine": "diffusers-compile",
                    "dtype": "fp32",
                    "error": "InvalidCxxCompiler: no working C++ compiler | found",
                },
                _row("rfmpc", 0.2, case="small", dtype="fp32", flops=1e8),
            ],
            "generation": [
                _row("rfmpc", 1.0, config="sd3-medium", steps=28, dtype="bfloat16", flops=1e12),
                _row("diffusers", 3.0, config="sd3-medium", steps=28, dtype="bfloat16"),
            ],
            "switch": {
                "field": "f",
                "N": 28,
                "k": 10,
                "step_s": 0.01,
                "loadavg_1min": [1, 1],
                "generation": {"median_s": 0.28, "compile_s": 1.0},
                "finish": {"median_s": 0.18},
                "methods": [
                    {
                        "method": "mpc",
                        "nfe": 30,
                        "extra_nfe": 12,
                        "wall_s": 0.2,
                        "planning_s": 0.0,
                        "overhead_s": 0.02,
                        "overhead_of_generation_pct": 7.1,
                        "overhead_per_remaining_step_pct": 11.1,
                        "overhead_per_controlled_step_pct": 66.7,
                        "compile_s": 2.0,
                        "fallback": False,
                    },
                    {"method": "shooting", "error": "RuntimeError: out of memory"},
                ],
            },
        },
    }


def test_derive_ratios_mfu_and_goals(report):
    rec = report.derive(_fabricated())
    rows = {r["engine"]: r for r in rec["sections"]["mmdit"]}
    assert rows["diffusers"]["time_ratio_vs_rfmpc"] == pytest.approx(2.0)
    assert rows["rfmpc"]["mfu"] == pytest.approx(1e8 / 0.2 / 1e9)
    assert "mfu" not in rows["diffusers-compile"]
    assert all("not measured on this device" in g["verdict"] for g in rec["goals"])


def test_goal_verdicts_on_target_device(report):
    rec = report.derive(_fabricated("gpu", "NVIDIA H100 80GB HBM3"))
    verdicts = {g["goal"].split(" ")[0]: g["verdict"] for g in rec["goals"]}
    assert verdicts["SD3-medium"] == "met"
    assert verdicts["MPC"] == "NOT met"
    assert verdicts["shooting"] == "not measured"


def test_markdown_and_files(report, tmp_path):
    rec = report.derive(_fabricated())
    md = report.markdown(rec)
    assert "**failed:** InvalidCxxCompiler" in md  # the reason, not a number
    assert "\\|" in md  # pipes inside a reason are escaped
    assert "not measured on this device" in md
    assert "**failed:** RuntimeError: out of memory" in md
    md_path, js_path = report.write(rec, tmp_path)
    assert md_path.name == "2000-01-02-cpu-test-cpu-x2.md"
    assert json.loads(js_path.read_text())["sections"]["mmdit"][0]["engine"] == "diffusers"
    assert md_path.read_text() == md
