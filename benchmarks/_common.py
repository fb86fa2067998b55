"""What the benchmarks share: timing, peak memory, XLA memory analysis, load average, markdown
tables, child processes, the tests' fixtures and the prompts.

Only the standard library is imported at the top; JAX and torch are imported by the helpers that
need them, so a benchmark's import stays cheap and its worker processes start quickly.

Timing (:func:`time_calls`): the first call (compilation + run) is timed apart as
``warmup_s``; optionally one more untimed call lets allocators and autotuners settle; then
``runs`` calls are timed one by one, each synchronised (``block_until_ready`` by default), and
summarised by :func:`summary` (median, min, count, every time). Peak memory
(:func:`peak_memory`): the device's ``peak_bytes_in_use`` where the backend reports it, else the
process's peak RSS (``rfmpc.metrics.peak_memory``, the library's one implementation).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TESTS = ROOT / "tests"

#: The prompt the speed benchmarks generate (one of the embedded model's training scenes).
PROMPT = "a red circle at the top left on a blue background"


# ============================================================================ child processes
def module_cmd(name: str, *args: str, python: str | None = None) -> list[str]:
    """``[python, "-m", "benchmarks.<name>", *args]``: start a benchmark (or its worker)."""
    return [python or sys.executable, "-m", f"benchmarks.{name}", *args]


def child_env(env: dict | None = None, first: Sequence[str] = ()) -> dict:
    """``env`` (default: this process's) with ``first`` and then the repository root prepended
    to ``PYTHONPATH``, so that ``python -m benchmarks.<name>`` imports from this checkout."""
    env = dict(os.environ if env is None else env)
    paths = [*first, str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


# ============================================================================ timing
def block(out):
    """Wait for every array in ``out`` (any pytree); returns ``out``."""
    import jax

    jax.block_until_ready(out)
    return out


def summary(times: Sequence[float]) -> dict:
    """``median_s``, ``min_s``, ``n`` and ``times_s`` of per-call wall times."""
    times = list(times)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "n": len(times),
        "times_s": times,
    }


def time_calls(
    fn: Callable[[], Any],
    runs: int,
    sync: Callable[[Any], Any] = block,
    *,
    warmup: bool = True,
    settle: bool = False,
) -> tuple[dict, Any]:
    """Time ``runs`` calls of ``fn()``, each followed by ``sync(out)``; ``(stats, last out)``.

    With ``warmup`` the first call (compilation + run) is timed apart as ``warmup_s``; with
    ``settle`` one more untimed call follows it. ``stats`` is :func:`summary` of the timed calls
    (plus ``warmup_s``).
    """
    stats, out = {}, None
    if warmup:
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        stats["warmup_s"] = time.perf_counter() - t0
        if settle:
            sync(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t0)
    return {**stats, **summary(times)}, out


# ============================================================================ memory
def peak_memory(rss_kind: str = "process peak RSS") -> dict:
    """This process's peak memory as ``{"bytes", "kind"}``: the device's ``peak_bytes_in_use``
    (kind ``device peak_bytes_in_use``) where reported, else the peak RSS (kind ``rss_kind``)."""
    from rfmpc.metrics import peak_memory as _peak

    n, source = _peak()
    kind = "device peak_bytes_in_use" if source.startswith("device") else rss_kind
    return {"bytes": n, "kind": kind}


def torch_peak_memory() -> dict | None:
    """torch's ``max_memory_allocated`` on CUDA as ``{"bytes", "kind"}``; None without CUDA."""
    import torch

    if torch.cuda.is_available():
        return {"bytes": int(torch.cuda.max_memory_allocated()), "kind": "torch max_allocated"}
    return None


def current_rss() -> int:
    """This process's resident set size now, in bytes (``/proc/self/status``; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_analysis(compiled) -> dict | None:
    """XLA's buffer assignment of a compiled executable (``jit(f).lower(...).compile()``):
    ``temp``, ``argument`` and ``output`` bytes and their sum as ``bytes`` (None if the backend
    has no analysis)."""
    try:
        ma = compiled.memory_analysis()
        parts = {n: int(getattr(ma, f"{n}_size_in_bytes")) for n in ("temp", "argument", "output")}
    except Exception:
        return None
    return {"bytes": sum(parts.values()), "kind": "XLA memory_analysis temp+arg+out", **parts}


# ============================================================================ the machine
def loadavg_1min(default: float | None = None) -> float | None:
    """The 1-minute load average (``default`` where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return default


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(name: str) -> str:
    """``name`` as a lower-case file-name part (runs of other characters become ``-``)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def save_result(stem: str | os.PathLike, files: dict[str, str | bytes]) -> Path:
    """Write a result's files (``{".md": text, ".json": text, ...}``) next to each other under
    ``stem`` and return the stem used.

    A second run that would land on the same name (same benchmark, device and day) goes to
    ``stem-2``, ``stem-3``, ...: a result already written is never replaced. Each file is
    written atomically (:func:`rfmpc.io.atomic_write_bytes`: temp file, fsync, rename), so an
    interrupted run leaves no half-written result. Write further files (a PNG) under the
    returned stem.
    """
    from rfmpc.io import atomic_write_bytes

    base = Path(stem)
    chosen, n = base, 1
    while any(chosen.with_name(chosen.name + ext).exists() for ext in files):
        n += 1
        chosen = base.with_name(f"{base.name}-{n}")
    for ext, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        atomic_write_bytes(chosen.with_name(chosen.name + ext), data)
    return chosen


# ============================================================================ markdown
def md_escape(s: str) -> str:
    """A string safe inside a markdown table cell."""
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_row(*cells) -> str:
    """``| a | b | ... |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A markdown table as lines: the header, its rule, one line a row (cells by ``str``; a
    short row, say a name and an error, is padded with empty cells)."""
    pad = lambda r: [*r, *[""] * (len(header) - len(r))]
    return [md_row(*header), "|" + "---|" * len(header), *(md_row(*pad(r)) for r in rows)]


def fmt(x, spec: str = "{:.3f}", none: str = "n/a") -> str:
    """``spec.format(x)``; ``none`` for None, ``str(x)`` when ``x`` does not fit the spec."""
    if x is None:
        return none
    try:
        return spec.format(x)
    except (TypeError, ValueError):
        return str(x)


# ============================================================================ test fixtures
def tests_module(name: str):
    """``tests/<name>.py`` (test helpers kept out of the wheel), imported under ``name``.

    Registered in ``sys.modules`` under its bare name, as the tests import it, so that a test
    process and a benchmark share one copy. Needs a checkout of the repository.
    """
    if name in sys.modules:
        return sys.modules[name]
    path = TESTS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the benchmarks from a checkout of the repository (the "
            "fixtures are test code, not part of the installed package)"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def ensure_torchvision_importable() -> None:
    """Before diffusers imports transformers: PyPI's torchvision does not load its ops beside
    CPU torch; ``tests/_torchvision.py`` explains the fix and applies it (no-op otherwise, and
    without the tests folder)."""
    if (TESTS / "_torchvision.py").is_file():
        tests_module("_torchvision").ensure_importable()


def torch_fixtures():
    """``tests/_torch_fixtures.py``: tiny offline PyTorch SD3 components and tokenizers."""
    ensure_torchvision_importable()  # the fixtures import diffusers and transformers
    return tests_module("_torch_fixtures")


# ============================================================================ prompts
def prompt_pair(seed: int = 0) -> tuple[str, str]:
    """A switch pair on the procedural grammar: a one-object scene (seed ``seed``) and the same
    scene with one attribute changed (``mutate_scene``), as prompts ``(A, B)``."""
    import numpy as np

    from rfmpc.data.grammar import sample_scene, to_prompt
    from rfmpc.data.scene import DEFAULT_SHAPES
    from rfmpc.data.train_text import mutate_scene

    rng = np.random.default_rng(seed)
    a = sample_scene(rng, n_objects=1)
    b = mutate_scene(a, rng, 1, shapes=DEFAULT_SHAPES)
    return to_prompt(a), to_prompt(b)
