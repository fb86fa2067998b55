"""Make ``import torchvision`` work beside the CPU build of torch (no pytest here).

PyPI's torchvision wheels are built against CUDA torch; with the CPU build of torch that the
test extra pins (``torch==2.13.0``), torchvision's compiled ops do not load and its
``_meta_registrations`` fails on ``register_fake("torchvision::nms")`` (the op was never
defined). deepinv and transformers (through diffusers' ``StableDiffusion3Pipeline``) import
torchvision, so they fail too. Nothing this project runs calls torchvision's ops: when they are
missing, :func:`ensure_importable` defines the two schemas torchvision registers unconditionally
(``nms``, ``qnms``), with no kernel, so the import goes through; calling them would still raise.
The tests use it through ``_deepinv.py``; the benchmarks through ``benchmarks/_common.py``.
"""

from __future__ import annotations

import importlib.util
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIB = []  # keeps the Library (and its definitions) alive


def ops_load() -> bool:
    """Whether torchvision's compiled ops library loads beside the installed torch."""
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


def ensure_importable() -> None:
    """Define torchvision's two schemas if its ops cannot load (no-op without torchvision, once
    torchvision is imported, or when its ops load)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        return
    if "torchvision" in sys.modules or _LIB or ops_load():
        return
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIB.append(lib)
