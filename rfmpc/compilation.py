"""Compilation: a persistent XLA compilation cache, and compile time measured apart from run time.

rfmpc jits at its public entry points (the diffrax solve, the controllers' planners, the inverse
solvers), so a program is compiled once per (shapes, static configuration) and reused for every
later call with the same shapes: new prompts, seeds, noise, conditioning and the CFG scale are
traced arguments, never baked-in constants. What *is* static, and so costs one compile per value:
the number of steps and the ``(start, stop)`` segment of a solve, the image size and batch,
whether CFG is on at all (``guidance_scale > 1``), a controller's method and option dataclass.

Two tools:

* :func:`enable_compilation_cache` turns on JAX's persistent compilation cache (an on-disk cache
  keyed by the program and the backend), so a *new process* that compiles the same program loads
  it from disk instead of recompiling. The CLI exposes it as ``--compilation-cache DIR`` (or the
  ``RFMPC_COMPILATION_CACHE`` environment variable).
* :class:`CompileStats` counts the XLA compilations that happen inside a ``with`` block and adds
  up their tracing / lowering / backend-compile seconds, from ``jax.monitoring`` events. The CLI's
  ``--json`` records and the benchmarks use it to report compile time separately from step time.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import jax

__all__ = ["CompileStats", "default_cache_dir", "enable_compilation_cache"]

ENV_VAR = "RFMPC_COMPILATION_CACHE"

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_MISS = "/jax/compilation_cache/cache_misses"


def default_cache_dir() -> Path:
    """``$RFMPC_COMPILATION_CACHE``, else ``$XDG_CACHE_HOME/rfmpc/jax`` (``~/.cache/rfmpc/jax``)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rfmpc" / "jax"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in ``path`` (created if missing).

    Every compiled program is written there (no minimum compile time or size), so a later process
    running the same shapes and configuration skips XLA compilation. The cache is JAX's own: its
    entries are keyed by the program text, the jax/jaxlib version, the backend and the compile
    options, so a stale or foreign entry is never used for a different program. Call it before the
    first compilation; calling it again with another path switches the directory.

    Args:
        path: the cache folder (default :func:`default_cache_dir`).

    Returns:
        The resolved cache folder.

    Raises:
        ValueError: if ``path`` exists and is not a directory, or cannot be created.
    """
    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"compilation cache path {str(folder)!r} exists and is not a directory; "
            "pass a folder (it is created if missing)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"cannot create the compilation cache folder {str(folder)!r}: {e}; "
            "pass a writable folder"
        ) from e
    folder = folder.resolve()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    # jax initialises the cache once per process, on the first compile; re-read the settings if a
    # compilation already happened (a no-op otherwise).
    try:
        from jax._src import compilation_cache as _cc

        _cc.reset_cache()
    except (ImportError, AttributeError):  # pragma: no cover - jax internals moved
        pass
    return folder


@dataclasses.dataclass
class CompileStats:
    """Counts compilations and their cost inside a ``with`` block (thread-safe, re-entrant).

    Attributes:
        programs: programs that went to the backend (compiled, or loaded from the persistent
            cache); :attr:`compiles` excludes the loads.
        compile_s: seconds in XLA backend compilation (or loading from the persistent cache).
        trace_s: seconds tracing Python to jaxprs.
        lower_s: seconds lowering jaxprs to StableHLO.
        cache_hits / cache_misses: persistent-cache lookups (0 unless the cache is enabled).
        wall_s: wall-clock seconds of the block.

    ``overhead_s = trace_s + lower_s + compile_s`` is the part of ``wall_s`` that a second call
    with the same shapes does not pay (tracing happens on cache misses of jit's in-memory cache
    only). Example::

        with CompileStats() as stats:
            out = pipe(prompts, seed=0)
        print(stats.compiles, stats.overhead_s, stats.wall_s - stats.overhead_s)
    """

    programs: int = 0
    compile_s: float = 0.0
    trace_s: float = 0.0
    lower_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    wall_s: float = 0.0
    _t0: float = dataclasses.field(default=0.0, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def compiles(self) -> int:
        """XLA compilations actually run (programs minus persistent-cache hits)."""
        return self.programs - self.cache_hits

    @property
    def overhead_s(self) -> float:
        """Tracing + lowering + compiling seconds."""
        return self.trace_s + self.lower_s + self.compile_s

    def _on_duration(self, name: str, secs: float, **_) -> None:
        with self._lock:
            if name == _BACKEND_COMPILE:
                self.programs += 1
                self.compile_s += float(secs)
            elif name == _TRACE:
                self.trace_s += float(secs)
            elif name == _LOWER:
                self.lower_s += float(secs)

    def _on_event(self, name: str, **_) -> None:
        with self._lock:
            if name == _CACHE_HIT:
                self.cache_hits += 1
            elif name == _CACHE_MISS:
                self.cache_misses += 1

    def __enter__(self) -> CompileStats:
        self._t0 = time.perf_counter()
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s += time.perf_counter() - self._t0
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)

    def as_dict(self) -> dict:
        """A JSON-ready record (seconds rounded to the microsecond)."""
        return {
            "programs": self.programs,
            "compiles": self.compiles,
            "compile_s": round(self.compile_s, 6),
            "trace_s": round(self.trace_s, 6),
            "lower_s": round(self.lower_s, 6),
            "overhead_s": round(self.overhead_s, 6),
            "run_s": round(max(self.wall_s - self.overhead_s, 0.0), 6),
            "wall_s": round(self.wall_s, 6),
            "persistent_cache_hits": self.cache_hits,
            "persistent_cache_misses": self.cache_misses,
        }
