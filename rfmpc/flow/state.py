"""``TrajectoryState``: everything needed to resume a flow trajectory exactly.

A state is a pytree (an ``equinox.Module``) holding the latent ``x`` after ``step`` Euler steps of
the grid ``sigmas``, the PRNG key the run was started with, the conditioning pytree and a small
static metadata record (prompt, model id, config hash...). Resuming from a saved state and running
to the end reproduces the uninterrupted run bit for bit, because the grid travels with the state
(the "scheduler reset" bug of re-deriving a schedule on resume cannot happen).

Files are safetensors (tensors) + JSON in the safetensors metadata (structure, metadata, a SHA-256
of every tensor), written atomically. Loading verifies format, version and checksum and raises
:class:`StateFileError` naming what is wrong.
"""

from __future__ import annotations

import json
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from rfmpc.io import load_safetensors, save_safetensors, tensors_digest

__all__ = ["StateFileError", "TrajectoryState", "init_state"]

_FORMAT = "rfmpc.TrajectoryState"
_VERSION = "1"


class StateFileError(ValueError):
    """A saved trajectory state is missing, truncated, tampered with or of another format."""


def _freeze_meta(meta: dict | None) -> tuple[tuple[str, Any], ...]:
    if not meta:
        return ()
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, (str, int, float, bool, type(None))):
            raise TypeError(
                f"metadata must map str to str/int/float/bool/None (JSON scalars); bad entry {k!r}"
            )
    return tuple(sorted(meta.items()))


class TrajectoryState(eqx.Module):
    """A resumable point on a flow trajectory.

    Attributes:
        x: the latent after ``step`` steps (any shape; NHWC for images).
        step: int32 scalar, number of Euler steps already taken (0 <= step <= num_steps).
        sigmas: the full ``(num_steps + 1,)`` grid, decreasing, ending in 0.
        key: the PRNG key of the run (a typed ``jax.random.key`` array), or None.
        cond: the conditioning pytree (arrays in nested dict/list/tuple), or None.
        meta: static JSON-scalar metadata as sorted ``(name, value)`` pairs; see :attr:`metadata`.
    """

    x: Array
    step: Int[Array, ""]
    sigmas: Float[Array, " n_plus_1"]
    key: PRNGKeyArray | None = None
    cond: Any = None
    meta: tuple[tuple[str, Any], ...] = eqx.field(static=True, default=())

    def __init__(self, x, step, sigmas, key=None, cond=None, meta=None):
        self.x = jnp.asarray(x)
        self.step = jnp.asarray(step, jnp.int32)
        self.sigmas = jnp.asarray(sigmas)
        if self.step.shape != ():
            raise ValueError(f"step must be a scalar, got shape {self.step.shape}")
        if self.sigmas.ndim != 1 or self.sigmas.shape[0] < 2:
            raise ValueError(f"sigmas must be a 1-D grid of >= 2 entries, got {self.sigmas.shape}")
        _check_step_range(self.step, self.sigmas.shape[0] - 1)
        if key is not None and not jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
        self.key = key
        self.cond = cond
        self.meta = meta if isinstance(meta, tuple) else _freeze_meta(meta)

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @property
    def sigma(self) -> Float[Array, ""]:
        """The noise level of ``x``: ``sigmas[step]``."""
        return self.sigmas[self.step]

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.meta)

    @property
    def done(self) -> bool:
        return int(self.step) == self.num_steps

    def replace(self, **changes) -> TrajectoryState:
        """A copy with some fields changed (``meta`` may be given as a dict)."""
        fields = {
            "x": self.x,
            "step": self.step,
            "sigmas": self.sigmas,
            "key": self.key,
            "cond": self.cond,
            "meta": self.meta,
        }
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"unknown TrajectoryState field(s) {sorted(unknown)}")
        fields.update(changes)
        return TrajectoryState(**fields)

    # ---------------------------------------------------------------- persistence
    def to_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Flatten to ``(tensors, json-able header)``: the safetensors payload of :meth:`save`."""
        tensors = {
            "x": np.asarray(self.x),
            "step": np.asarray(self.step),
            "sigmas": np.asarray(self.sigmas),
        }
        key_impl = None
        if self.key is not None:
            tensors["key"] = np.asarray(jax.random.key_data(self.key))
            key_impl = str(jax.random.key_impl(self.key))
        spec, leaves = _encode_tree(self.cond)
        for i, leaf in enumerate(leaves):
            tensors[f"cond.{i}"] = np.asarray(leaf)
        header = {
            "format": _FORMAT,
            "version": _VERSION,
            "cond_tree": json.dumps(spec),
            "key_impl": json.dumps(key_impl),
            "meta": json.dumps(self.metadata),
            "sha256": tensors_digest(tensors),
        }
        return tensors, header

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, np.ndarray], header: dict[str, str], source: str = "<memory>"
    ) -> TrajectoryState:
        if header.get("format") != _FORMAT:
            raise StateFileError(
                f"{source}: not an rfmpc trajectory state (format={header.get('format')!r}); "
                "save states with TrajectoryState.save"
            )
        if header.get("version") != _VERSION:
            raise StateFileError(
                f"{source}: state format version {header.get('version')!r} is not supported by "
                f"this rfmpc (expects {_VERSION}); re-create the state with this version"
            )
        digest = tensors_digest(tensors)
        if digest != header.get("sha256"):
            raise StateFileError(
                f"{source}: checksum mismatch (stored {header.get('sha256')}, computed {digest}): "
                "the file was modified or corrupted; discard it and re-run from an earlier state"
            )
        try:
            spec = json.loads(header["cond_tree"])
            key_impl = json.loads(header["key_impl"])
            meta = json.loads(header["meta"])
            cond_leaves = []
            i = 0
            while f"cond.{i}" in tensors:
                cond_leaves.append(jnp.asarray(tensors[f"cond.{i}"]))
                i += 1
            cond = _decode_tree(spec, cond_leaves)
            key = None
            if key_impl is not None:
                key = jax.random.wrap_key_data(jnp.asarray(tensors["key"]), impl=key_impl)
            return cls(
                x=jnp.asarray(tensors["x"]),
                step=jnp.asarray(tensors["step"]),
                sigmas=jnp.asarray(tensors["sigmas"]),
                key=key,
                cond=cond,
                meta=meta,
            )
        except (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise StateFileError(f"{source}: malformed trajectory state ({e})") from e

    def save(self, path: str | os.PathLike) -> None:
        """Save atomically to ``path`` (safetensors + JSON metadata, with a SHA-256)."""
        if os.path.isdir(path):
            raise ValueError(
                f"path {str(path)!r} is a directory; pass a file path such as "
                f"{os.path.join(str(path), 'state.safetensors')!r}"
            )
        tensors, header = self.to_tensors()
        save_safetensors(path, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrajectoryState:
        """Load a state saved by :meth:`save`, verifying format, version and checksum."""
        try:
            tensors, header = load_safetensors(path)
        except ValueError as e:
            raise StateFileError(
                f"cannot read trajectory state: {e}; the file is damaged: discard it and save "
                "the state again (TrajectoryState.save)"
            ) from e
        state = cls.from_tensors(tensors, header, source=str(path))
        s = int(state.step)
        if not 0 <= s <= state.num_steps:
            raise StateFileError(f"{path}: step {s} outside [0, {state.num_steps}]")
        return state


def _check_step_range(step, num_steps: int) -> None:
    """``0 <= step <= num_steps`` for a concrete step (a traced one is not checked)."""
    if isinstance(step, jax.core.Tracer):
        return
    s = int(step)
    if not 0 <= s <= num_steps:
        raise ValueError(
            f"step={s} is outside the grid's steps 0..{num_steps} (sigmas has {num_steps + 1} "
            "entries); pass the number of Euler steps already taken"
        )


def init_state(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    sigmas: Float[Array, " n_plus_1"],
    cond: Any = None,
    *,
    dtype=jnp.float32,
    meta: dict | None = None,
) -> TrajectoryState:
    """A fresh state at step 0: ``x = N(0, I)`` noise drawn from ``key`` (sigmas[0] must be 1)."""
    x = jax.random.normal(key, shape, dtype)
    return TrajectoryState(x=x, step=0, sigmas=sigmas, key=key, cond=cond, meta=meta)


# -------------------------------------------------------------------- pytree <-> JSON
def _encode_tree(tree) -> tuple[Any, list]:
    leaves: list = []

    def enc(t):
        if t is None:
            return {"t": "none"}
        if isinstance(t, dict):
            keys = list(t.keys())
            if not all(isinstance(k, str) for k in keys):
                raise TypeError("cond dicts must have str keys to be saved")
            return {"t": "dict", "k": keys, "v": [enc(t[k]) for k in keys]}
        if isinstance(t, (list, tuple)):
            return {"t": type(t).__name__, "v": [enc(v) for v in t]}
        if isinstance(t, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            leaves.append(t)
            return {"t": "leaf", "i": len(leaves) - 1}
        raise TypeError(
            f"cannot save conditioning leaf of type {type(t).__name__}: use arrays inside "
            "dicts/lists/tuples"
        )

    return enc(tree), leaves


def _decode_tree(spec, leaves):
    t = spec["t"]
    if t == "none":
        return None
    if t == "leaf":
        return leaves[spec["i"]]
    if t == "dict":
        return {k: _decode_tree(v, leaves) for k, v in zip(spec["k"], spec["v"], strict=True)}
    if t in ("list", "tuple"):
        vals = [_decode_tree(v, leaves) for v in spec["v"]]
        return vals if t == "list" else tuple(vals)
    raise ValueError(f"unknown tree node type {t!r}")
