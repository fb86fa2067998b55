"""Crash-safe file writing and a small bf16-capable safetensors writer/reader.

Everything rfmpc persists (trajectory states, cache blobs, checkpoints, converted weights) goes
through :func:`atomic_write_bytes`: write to a temporary file in the same directory, fsync,
``os.replace`` onto the target, fsync the directory. A crash leaves either the old file or the new
one, never a torn one. No pickle anywhere: tensors go to safetensors, metadata to JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["atomic_write_bytes", "load_safetensors", "save_safetensors", "tensors_digest"]

_DTYPE_NAMES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.bool_): "BOOL",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every filesystem / OS
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _contiguous(a) -> np.ndarray:
    """C-contiguous view/copy that keeps 0-d arrays 0-d (unlike ``np.ascontiguousarray``)."""
    return np.require(np.asarray(a), requirements="C")


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = _contiguous(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str; not for keys {bad}")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name in sorted(tensors):
        a = _contiguous(tensors[name])
        if a.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: unsupported dtype {a.dtype} for safetensors")
        b = a.tobytes()
        header[name] = {
            "dtype": _DTYPE_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        chunks.append(b)
        offset += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + b"".join(chunks)


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically save numpy arrays (incl. bfloat16) as a safetensors file."""
    atomic_write_bytes(path, _to_bytes({k: np.asarray(v) for k, v in tensors.items()}, metadata))


class SafetensorsReadError(ValueError):
    """A safetensors file is missing, truncated or corrupted."""


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole (small) safetensors file into memory: ``(tensors, metadata)``.

    Raises :class:`SafetensorsReadError` (a ``ValueError``) naming the file on truncation or
    corruption. For large checkpoints use ``weights_conversion.SafetensorsFile`` (memory-mapped).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise SafetensorsReadError(f"{path}: no such file") from e
    if len(raw) < 8:
        raise SafetensorsReadError(f"{path}: truncated ({len(raw)} bytes, no header)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise SafetensorsReadError(
            f"{path}: truncated or corrupted (header claims {n} bytes, file has {len(raw)})"
        )
    try:
        header = json.loads(raw[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsReadError(f"{path}: corrupted header ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsReadError(f"{path}: corrupted header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        try:
            dtype = _NAME_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            b, e = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise SafetensorsReadError(f"{path}: corrupted entry for {name!r} ({err})") from err
        if e - b != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or e > len(data) or b < 0:
            raise SafetensorsReadError(
                f"{path}: tensor {name!r} extends past the end of the file: truncated or corrupted"
            )
        out[name] = np.frombuffer(data[b:e], dtype=dtype).reshape(shape).copy()
    return out, dict(metadata)
