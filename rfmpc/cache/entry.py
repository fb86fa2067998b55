"""``CacheEntry``: one prompt's trajectory states at chosen steps, plus what makes them reusable.

An entry holds a prompt's pooled embedding (what similarity is measured on), the model id and a
``config_hash`` (model config + latent shape + schedule identity: an entry from another model,
resolution or sigma grid must never be resumed), and ``TrajectoryState`` snapshots of one run at
several steps, all on the same sigma grid. Each state carries its latent, step, the full grid,
the run's PRNG key and the conditioning, so resuming is exact (see ``rfmpc.flow.state``).

Serialisation (:func:`entry_to_tensors` / :func:`entry_from_tensors`) is safetensors + JSON:
tensors shared between states (the grid, the key, the conditioning are usually identical at
every step) are stored once, keyed by content; the JSON header records which tensor each state
uses and carries a SHA-256 over all tensors, and every state keeps its own checksum too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rfmpc.flow.state import StateFileError, TrajectoryState
from rfmpc.io import tensors_digest

__all__ = [
    "CacheEntry",
    "CacheEntryError",
    "config_hash",
    "entry_from_tensors",
    "entry_to_tensors",
    "new_entry_id",
    "normalize_states",
    "validate_entry_id",
]

_FORMAT = "rfmpc.CacheEntry"
_VERSION = "2"  # 2 added extras; version-1 blobs (no extras) still load
_READABLE = ("1", "2")
_ID_RE = re.compile(r"[0-9a-f]{32}")
_EXTRA_RE = re.compile(r"[a-z0-9_][a-z0-9_./-]{0,63}")


class CacheEntryError(ValueError):
    """A cache entry (or its blob) is missing, damaged, of another format, or inconsistent.

    ``kind`` says how (``corrupted``, ``truncated``, ``missing``, ``mismatch``, ``invalid_id``...).
    """

    kind: str = "corrupted"


def new_entry_id() -> str:
    """A fresh random entry id: 32 lowercase hex characters (128 bits)."""
    import secrets

    return secrets.token_hex(16)


def validate_entry_id(entry_id: object) -> str:
    """Return ``entry_id`` if it is 32 lowercase hex characters, else raise ``CacheEntryError``.

    Ids become file names, so this is what keeps an index row from naming a path outside the
    cache directory (``../../etc/passwd`` is not an id).
    """
    if not isinstance(entry_id, str) or _ID_RE.fullmatch(entry_id) is None:
        raise CacheEntryError(
            f"invalid cache entry id {entry_id!r}: ids are 32 lowercase hex characters"
        )
    return entry_id


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"config_hash keys must be str, got {k!r}")
            out[k] = _canonical(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _canonical(obj.tolist())
    if isinstance(obj, np.generic):
        return _canonical(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"config_hash values must be finite, got {obj!r}")
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(
        f"config_hash values must be JSON-like (str, int, float, bool, None, lists, dicts, numpy "
        f"scalars/arrays); got {type(obj).__name__}"
    )


def config_hash(**fields: Any) -> str:
    """A stable SHA-256 (hex) of ``fields`` as canonical JSON (sorted keys, tuples as lists).

    Put in everything that makes a trajectory state non-transferable: the model config (or its
    own hash), the latent shape and dtype, the schedule (``num_steps``, ``shift``...), guidance.
    Example: ``config_hash(model=cfg_dict, latent_shape=(1, 64, 64, 16), num_steps=28,
    shift=3.0)``. Floats hash by their shortest repr, so 3.0 and 3 differ: pass the same types.
    """
    if not fields:
        raise ValueError("config_hash needs at least one field, e.g. config_hash(num_steps=28)")
    text = json.dumps(_canonical(fields), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def normalize_states(
    states: Mapping[int, TrajectoryState] | Sequence[TrajectoryState],
) -> dict[int, TrajectoryState]:
    """Validate ``states`` (a dict step -> state, or a list) into a step-sorted dict.

    All states must share one sigma grid and one latent shape/dtype; each key must equal the
    state's own ``step``.
    """
    if isinstance(states, TrajectoryState):
        raise TypeError("states must be a dict {step: TrajectoryState} or a list of states")
    if isinstance(states, Mapping):
        items = list(states.items())
    elif isinstance(states, Sequence) and not isinstance(states, (str, bytes)):
        items = []
        for s in states:
            if not isinstance(s, TrajectoryState):
                raise TypeError(f"states list must hold TrajectoryState, got {type(s).__name__}")
            items.append((int(s.step), s))
    else:
        raise TypeError(
            f"states must be a dict {{step: TrajectoryState}} or a list, got {type(states)}"
        )
    if not items:
        raise ValueError("states is empty: cache at least one TrajectoryState")
    out: dict[int, TrajectoryState] = {}
    ref = None
    for step, st in items:
        if not isinstance(st, TrajectoryState):
            raise TypeError(f"states[{step!r}] must be a TrajectoryState, got {type(st).__name__}")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"states keys must be int steps, got {step!r}")
        step = int(step)
        if step != int(st.step):
            raise ValueError(f"states key {step} differs from that state's step {int(st.step)}")
        if not 0 <= step <= st.num_steps:
            raise ValueError(f"state step {step} outside [0, {st.num_steps}]")
        if step in out:
            raise ValueError(f"two states for step {step}")
        if ref is None:
            ref = st
        else:
            if not np.array_equal(np.asarray(st.sigmas), np.asarray(ref.sigmas)):
                raise ValueError(
                    f"the state at step {step} is on another sigma grid than the state at step "
                    f"{int(ref.step)}: an entry caches one run, so all states share its grid"
                )
            if st.x.shape != ref.x.shape or st.x.dtype != ref.x.dtype:
                raise ValueError(
                    f"the state at step {step} has latent {st.x.shape} {st.x.dtype}, the state at "
                    f"step {int(ref.step)} {ref.x.shape} {ref.x.dtype}: cache one run per entry"
                )
        out[step] = st
    return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True, eq=False)
class CacheEntry:
    """A cached prompt trajectory.

    Attributes:
        entry_id: 32 lowercase hex characters.
        prompt: the prompt text.
        pooled: the pooled prompt embedding, float32 ``(d,)`` (read-only).
        model_id: the model the states came from.
        config_hash: see :func:`config_hash`; lookups only match entries with an equal one.
        states: step -> ``TrajectoryState``, sorted by step, all on one sigma grid.
        created: creation time (seconds since the epoch).
        last_used: last time a lookup returned this entry.
        nbytes: stored size in bytes.
        extras: named arrays stored beside the states (read-only numpy), e.g. A's velocity at
            each cached step (``"velocity/12"``) and its final latent (``"final"``): what a
            switch controller would otherwise recompute.
    """

    entry_id: str
    prompt: str
    pooled: np.ndarray
    model_id: str
    config_hash: str
    states: Mapping[int, TrajectoryState]
    created: float
    last_used: float
    nbytes: int = 0
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(self.states)

    @property
    def num_steps(self) -> int:
        return next(iter(self.states.values())).num_steps

    @property
    def sigmas(self):
        return next(iter(self.states.values())).sigmas

    def state(self, step: int) -> TrajectoryState:
        """The cached state at ``step`` (``KeyError`` naming the cached steps if absent)."""
        try:
            return self.states[int(step)]
        except KeyError:
            raise KeyError(f"entry {self.entry_id} caches steps {self.steps}, not {step}") from None


def _as_pooled(pooled) -> np.ndarray:
    a = np.asarray(pooled, dtype=np.float32)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"pooled must be a (d,) or (1, d) embedding, got shape {np.shape(pooled)}")
    if not np.all(np.isfinite(a)) or not np.any(a):
        raise ValueError("pooled must be finite and non-zero (cosine similarity needs a norm)")
    a = a.copy()
    a.flags.writeable = False
    return a


def _check_str(value, name: str) -> str:
    if not isinstance(value, str) or (name != "prompt" and not value):
        raise TypeError(f"{name} must be a non-empty str, got {value!r}")
    return value


def normalize_extras(extras) -> dict[str, np.ndarray]:
    """Validate ``extras`` (name -> array) into read-only numpy arrays, names sorted."""
    if extras is None:
        return {}
    if not isinstance(extras, Mapping):
        raise TypeError(f"extras must be a dict name -> array, got {type(extras).__name__}")
    out = {}
    for name in sorted(extras):
        if not isinstance(name, str) or _EXTRA_RE.fullmatch(name) is None:
            raise ValueError(
                f"extras name {name!r} is invalid: use 1-64 characters of a-z, 0-9, '_', '.', "
                "'/', '-' (e.g. 'velocity/12')"
            )
        a = np.array(extras[name], copy=True)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"extras[{name!r}] must be a numeric array, got dtype {a.dtype}")
        a.flags.writeable = False
        out[name] = a
    return out


def make_entry(
    entry_id: str,
    prompt: str,
    pooled,
    states,
    *,
    model_id: str,
    config_hash: str,
    created: float,
    last_used: float | None = None,
    nbytes: int = 0,
    extras=None,
) -> CacheEntry:
    """Validate the pieces and build a :class:`CacheEntry`."""
    return CacheEntry(
        entry_id=validate_entry_id(entry_id),
        prompt=_check_str(prompt, "prompt"),
        pooled=_as_pooled(pooled),
        model_id=_check_str(model_id, "model_id"),
        config_hash=_check_str(config_hash, "config_hash"),
        states=normalize_states(states),
        created=float(created),
        last_used=float(created if last_used is None else last_used),
        nbytes=int(nbytes),
        extras=normalize_extras(extras),
    )


def _array_key(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def entry_to_tensors(entry: CacheEntry) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Flatten an entry to ``(tensors, metadata)`` for safetensors (shared tensors stored once)."""
    tensors: dict[str, np.ndarray] = {"pooled": np.asarray(entry.pooled, np.float32)}
    by_content: dict[str, str] = {}
    states_meta = {}
    for step, st in entry.states.items():
        st_tensors, st_header = st.to_tensors()
        names = {}
        for name, arr in st_tensors.items():
            arr = np.require(np.asarray(arr), requirements="C")
            key = _array_key(arr)
            if key not in by_content:
                by_content[key] = f"t.{len(by_content)}"
                tensors[by_content[key]] = arr
            names[name] = by_content[key]
        states_meta[str(step)] = {"header": st_header, "tensors": names}
    for name, arr in entry.extras.items():
        tensors[f"extra.{name}"] = np.require(np.asarray(arr), requirements="C")
    info = {
        "entry_id": entry.entry_id,
        "prompt": entry.prompt,
        "model_id": entry.model_id,
        "config_hash": entry.config_hash,
        "created": entry.created,
        "steps": list(entry.states),
        "states": states_meta,
        "extras": list(entry.extras),
    }
    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "entry": json.dumps(info, ensure_ascii=False),
        "sha256": tensors_digest(tensors),
    }
    return tensors, metadata


def entry_from_tensors(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    *,
    source: str = "<memory>",
    last_used: float | None = None,
    nbytes: int = 0,
) -> CacheEntry:
    """Rebuild an entry from :func:`entry_to_tensors` output, verifying every checksum.

    Raises :class:`CacheEntryError` naming ``source`` and what is wrong.
    """
    if metadata.get("format") != _FORMAT:
        raise CacheEntryError(
            f"{source}: not an rfmpc cache entry (format={metadata.get('format')!r})"
        )
    if metadata.get("version") not in _READABLE:
        raise CacheEntryError(
            f"{source}: cache entry format version {metadata.get('version')!r} is not supported "
            f"(reads {', '.join(_READABLE)}); clear the cache with `rfmpc cache clear`"
        )
    digest = tensors_digest(tensors)
    if digest != metadata.get("sha256"):
        raise CacheEntryError(f"{source}: checksum mismatch: the blob is corrupted")
    try:
        info = json.loads(metadata["entry"])
        states = {}
        for step in info["steps"]:
            sm = info["states"][str(step)]
            st_tensors = {name: tensors[t] for name, t in sm["tensors"].items()}
            states[int(step)] = TrajectoryState.from_tensors(
                st_tensors, sm["header"], source=f"{source} (state at step {step})"
            )
        return make_entry(
            info["entry_id"],
            info["prompt"],
            tensors["pooled"],
            states,
            model_id=info["model_id"],
            config_hash=info["config_hash"],
            created=info["created"],
            last_used=last_used,
            nbytes=nbytes,
            extras={name: tensors[f"extra.{name}"] for name in info.get("extras", [])},
        )
    except CacheEntryError:
        raise
    except (StateFileError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise CacheEntryError(f"{source}: malformed cache entry ({e})") from e


def payload_nbytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> int:
    """Approximate stored size: tensor bytes plus the JSON metadata."""
    return int(sum(np.asarray(a).nbytes for a in tensors.values())) + len(
        json.dumps(dict(metadata)).encode()
    )
