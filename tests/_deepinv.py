"""Import deepinv (a test extra) for the operator parity tests, or skip.

deepinv imports torchvision, whose PyPI wheels do not load their ops beside the CPU build of
torch: ``_torchvision.ensure_importable`` explains and works around it. The physics operators
the tests compare never touch torchvision's ops.
"""

from __future__ import annotations

import importlib.util

import pytest
from _torchvision import ensure_importable


def import_deepinv():
    """``deepinv``, importing it with the schema shim when torchvision's ops are missing."""
    for name in ("torch", "torchvision", "deepinv"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    ensure_importable()
    return pytest.importorskip("deepinv")
