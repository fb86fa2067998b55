"""``python benchmarks/<name>.py`` -> ``python -m benchmarks.<name>``: the one bootstrap.

A benchmark run as a file has ``benchmarks/`` (not the repository root) on ``sys.path``, so
``import benchmarks._common`` would fail. Each runnable benchmark starts with::

    if __name__ == "__main__" and not __package__:  # run as a file: re-run as a module
        import _as_module  # noqa: F401  (execs ``python -m benchmarks.<name>``, never returns)

Importing this module under its bare name (what the line above does) replaces the process
(``os.execve``) by ``python -m benchmarks.<name>`` with the same arguments and the repository
root first on ``PYTHONPATH``; it changes no ``sys.path`` in process. The cost is one more
interpreter start-up (no heavy import has run yet). Child processes the benchmark starts inherit
that ``PYTHONPATH``. Imported as ``benchmarks._as_module`` it does nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def rerun_as_module() -> None:
    """Replace this process by ``python -m benchmarks.<stem of __main__>`` (same arguments)."""
    script = Path(sys.modules["__main__"].__file__).resolve()
    env = dict(os.environ)
    root = str(script.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", f"benchmarks.{script.stem}", *sys.argv[1:]]
    os.execve(sys.executable, argv, env)


if __name__ == "_as_module":  # imported by a script's bootstrap line (not as benchmarks._as_module)
    rerun_as_module()
