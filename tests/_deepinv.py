"""Import deepinv (a test extra) for the operator parity tests, or skip.

PyPI's torchvision wheels are built against CUDA torch; with the CPU build of torch that the
test extra pins (``torch==2.13.0``), torchvision's compiled ops do not load and its
``_meta_registrations`` fails on ``register_fake("torchvision::nms")`` (the op was never
defined). deepinv imports torchvision first, so it would fail too. The physics operators the
tests compare never touch torchvision's ops: when the ops are missing, this helper defines the
two schemas torchvision registers unconditionally (``nms``, ``qnms``), with no kernel, so the
import goes through; calling them would still raise.
"""

from __future__ import annotations

import importlib.util

import pytest

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIB = []  # keeps the Library (and its definitions) alive


def _torchvision_ops_load() -> bool:
    import ctypes
    import os

    spec = importlib.util.find_spec("torchvision")
    folder = os.path.dirname(spec.origin)
    libs = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")]
    if not libs:
        return False
    import torch  # noqa: F401  (loads libtorch, which _C links against)

    try:
        ctypes.CDLL(os.path.join(folder, libs[0]))
    except OSError:
        return False
    return True


def import_deepinv():
    """``deepinv``, importing it with the schema shim when torchvision's ops are missing."""
    for name in ("torch", "torchvision", "deepinv"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    import sys

    if "torchvision" not in sys.modules and not _torchvision_ops_load() and not _LIB:
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            lib.define(schema)
        _LIB.append(lib)
    return pytest.importorskip("deepinv")
