"""The torch side of the benchmarks: diffusers beside CPU torch, and the tests' torch fixtures.

``StableDiffusion3Pipeline`` imports transformers, which imports torchvision when it is
installed (the test extra installs it for deepinv), and PyPI's torchvision does not load its ops
beside CPU torch. ``tests/_torchvision.py`` explains the fix; this module applies it from the
benchmarks (the same way ``_priors.py`` reaches the tests' helpers).
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent / "tests"


def ensure_torchvision_importable() -> None:
    """No-op unless torchvision is installed and its ops fail to load (then: define them)."""
    if not (_TESTS / "_torchvision.py").is_file():  # an installed copy without the tests
        return
    if str(_TESTS) not in sys.path:
        sys.path.append(str(_TESTS))
    from _torchvision import ensure_importable

    ensure_importable()


def torch_fixtures():
    """``tests/_torch_fixtures.py``: tiny offline PyTorch SD3 components and tokenizers (test
    code, kept out of the wheel; the benchmarks borrow it as ``_priors.py`` borrows
    ``tests/_models.py``)."""
    if not (_TESTS / "_torch_fixtures.py").is_file():
        raise FileNotFoundError(
            f"{_TESTS / '_torch_fixtures.py'} is missing: run the benchmarks from a checkout of "
            "the repository (the fixtures are test code, not part of the installed package)"
        )
    ensure_torchvision_importable()  # the fixtures import diffusers and transformers
    if str(_TESTS) not in sys.path:
        sys.path.append(str(_TESTS))
    import _torch_fixtures

    return _torch_fixtures
