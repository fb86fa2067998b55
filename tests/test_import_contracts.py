"""The import-layering contracts of ``pyproject.toml`` (``[tool.importlinter]``) hold.

``lint-imports`` (import-linter) builds the import graph of ``rfmpc`` and ``weights_conversion``
from every import statement, those inside functions included, and checks each contract,
indirect chains too. CI installs it with the ``test`` extra; without it this test is skipped.
The runtime half (what importing a layer actually loads) is ``tests/test_layering.py``.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_lint_imports_keeps_every_contract():
    pytest.importorskip("importlinter", reason="import-linter is not installed (test extra)")
    code = (
        "from importlinter.cli import lint_imports_command\n"
        "lint_imports_command(['--no-cache', '--no-logo', 'pyproject.toml'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"an import contract is broken:\n{out[-6000:]}"
    assert f"{len(_contracts())} kept, 0 broken" in out, out[-3000:]


def test_cli_contract_covers_every_module():
    """The "nothing below the CLI imports it" contract names every other top-level module, so
    a new module cannot slip past it unchecked."""
    import rfmpc

    tops = {f"rfmpc.{m.name}" for m in pkgutil.iter_modules(rfmpc.__path__)} - {"rfmpc.cli"}
    sources = set(_contracts()["cli"]["source_modules"])
    assert tops - sources == set(), "add these modules to the 'cli' contract in pyproject.toml"
    assert "weights_conversion" in sources
