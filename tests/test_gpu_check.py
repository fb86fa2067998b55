"""The prepared GPU check (``benchmarks/gpu_check.sh``) rehearsed on the CPU at toy sizes.

The real run happens only on a lent GPU machine, inside an 8-minute window, with no network:
this rehearsal runs every section of the same script (forward with diffusers eager and
``torch.compile``, generation, float32 parity, switch controllers) so that it cannot rot.
It is not a timed test: it checks that every section ran and wrote its record.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("torch", "diffusers")),
    reason="the GPU check compares against diffusers: pip install -e '.[test]'",
)
def test_gpu_check_rehearsal(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--rehearse"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "benchmarks" / "results"
    (md,) = results.glob("*-rehearsal.md")
    (js,) = results.glob("*-rehearsal.json")
    rec = json.loads(js.read_text())
    sections = rec["sections"]
    assert set(sections) == {
        "env",
        "fwd-sd3-medium",
        "fwd-sd35-large",
        "generation",
        "parity",
        "switch",
    }
    for name, sec in sections.items():
        assert "error" not in sec and "incomplete" not in sec, (name, sec)
    for name in ("fwd-sd3-medium", "fwd-sd35-large"):
        engines = sections[name]["engines"]
        for engine in ("rfmpc", "diffusers", "diffusers-compile"):
            assert engines[engine]["median_s"] > 0, (name, engine, engines[engine])
    assert {"rfmpc", "diffusers"} <= set(sections["generation"]["engines"])
    assert sections["parity"]["rel_max_err"] < 1e-4
    methods = {m["method"]: m for m in sections["switch"]["methods"]}
    assert set(methods) == {"direct", "mpc"}
    assert all("error" not in m for m in methods.values()), methods
    text = md.read_text()
    assert "REHEARSAL" in text and "float32 parity" in text
