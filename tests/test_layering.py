"""Layering: ``rfmpc.inverse`` (operators, solvers, metrics) never imports a model or the
pipeline; those reach it only as a velocity field through :mod:`rfmpc.restore`."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INVERSE = ROOT / "rfmpc" / "inverse"
#: Modules rfmpc.inverse must not load: models, the pipeline and what is built on them.
FORBIDDEN = ("rfmpc.models", "rfmpc.pipeline", "rfmpc.restore", "rfmpc.cli", "rfmpc.embedded")


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_importing_inverse_loads_no_model_or_pipeline():
    """Import rfmpc.inverse and every submodule in a fresh interpreter; list what got loaded."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import rfmpc.inverse as inv\n"
        "subs = [m.name for m in pkgutil.iter_modules(inv.__path__, 'rfmpc.inverse.')]\n"
        "for m in subs: importlib.import_module(m)\n"
        "print(json.dumps({'subs': subs, 'loaded': sorted(sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert "rfmpc.inverse.operators" in rec["subs"] and "rfmpc.inverse.mpc_flow" in rec["subs"]
    assert "rfmpc.inverse.cli" not in rec["subs"]  # moved to rfmpc.restore / rfmpc.cli.restore
    leaked = [m for m in rec["loaded"] if _forbidden(m)]
    assert leaked == [], f"importing rfmpc.inverse loaded {leaked}"


def test_inverse_source_has_no_model_or_pipeline_import():
    """Also the imports inside functions (which the subprocess check cannot see)."""
    offenders = []
    for path in sorted(INVERSE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if _forbidden(n)]
    assert offenders == []
