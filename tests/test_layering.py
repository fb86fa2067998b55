"""Layering at run time and without import-linter, from the contracts of ``pyproject.toml``.

``tests/test_import_contracts.py`` runs ``lint-imports`` on the ``[tool.importlinter]``
contracts (every import statement, indirect chains included). This file checks the same
``forbidden`` contracts two more ways, so that the two never disagree:

* importing a layer and every submodule in a fresh interpreter loads none of its forbidden
  modules (what really happens at run time, e.g. ``rfmpc.inverse`` sees a model only as a
  velocity field handed to it through :mod:`rfmpc.restore`);
* no import statement of the layer, inside functions too, names a forbidden module directly
  (works where import-linter is not installed).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
#: The forbidden contracts whose sources are packages or modules of rfmpc (the "cli" contract,
#: which lists every module, is import-linter's alone).
FORBIDDEN = {
    c["id"]: c for c in _CONFIG["contracts"] if c["type"] == "forbidden" and c["id"] != "cli"
}


def _matches(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def test_the_contracts_are_the_documented_ones():
    assert set(FORBIDDEN) == {"flow", "control", "inverse", "models", "sharding"}
    assert {"rfmpc.models", "rfmpc.pipeline", "rfmpc.cli"} <= set(
        FORBIDDEN["inverse"]["forbidden_modules"]
    )
    assert "rfmpc.inverse" in FORBIDDEN["control"]["forbidden_modules"]
    assert "rfmpc.control" in FORBIDDEN["inverse"]["forbidden_modules"]
    assert {"weights_conversion", "rfmpc.data"} <= set(FORBIDDEN["models"]["forbidden_modules"])


@pytest.mark.parametrize("contract", sorted(FORBIDDEN))
def test_importing_a_layer_loads_nothing_forbidden(contract):
    """Import each source (and every submodule of a package) in a fresh interpreter; list what
    got loaded."""
    c = FORBIDDEN[contract]
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"sources = {c['source_modules']!r}\n"
        "subs = []\n"
        "for name in sources:\n"
        "    mod = importlib.import_module(name)\n"
        "    if hasattr(mod, '__path__'):\n"
        "        subs += [m.name for m in pkgutil.walk_packages(mod.__path__, name + '.')]\n"
        "for m in subs: importlib.import_module(m)\n"
        "print(json.dumps({'subs': subs, 'loaded': sorted(sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    if contract == "inverse":
        assert "rfmpc.inverse.operators" in rec["subs"] and "rfmpc.inverse.mpc_flow" in rec["subs"]
        assert "rfmpc.inverse.cli" not in rec["subs"]  # moved to rfmpc.restore / rfmpc.cli
    leaked = [m for m in rec["loaded"] if _matches(m, c["forbidden_modules"])]
    assert leaked == [], f"importing {c['source_modules']} loaded {leaked}"


def _files(source: str) -> list[Path]:
    path = ROOT.joinpath(*source.split("."))
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("contract", sorted(FORBIDDEN))
def test_no_import_statement_names_a_forbidden_module(contract):
    """Every import statement, those inside functions included (absolute and relative)."""
    c = FORBIDDEN[contract]
    offenders = []
    for source in c["source_modules"]:
        for path in _files(source):
            rel = path.relative_to(ROOT).with_suffix("")
            package = list(rel.parts[:-1])  # a module's package; an __init__'s own
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = package[: len(package) - node.level + 1] if node.level else []
                    module = ".".join([*base, *([node.module] if node.module else [])])
                    names = [module] + [f"{module}.{a.name}" for a in node.names]
                else:
                    continue
                offenders += [
                    f"{rel}:{node.lineno} {n}" for n in names if _matches(n, c["forbidden_modules"])
                ]
    assert offenders == []
