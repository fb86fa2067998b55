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
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = [
    "MAX_HEADER_BYTES",
    "SafetensorsReadError",
    "atomic_write_bytes",
    "load_safetensors",
    "parse_safetensors_header",
    "remove_stale_temp_files",
    "save_safetensors",
    "stale_temp_files",
    "tensors_digest",
]

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


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic round trip
    os.umask(mask)
    return mask


def user_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``.

    Atomic writes go through ``tempfile.mkstemp``, which creates 0600 files; the files rfmpc
    writes for the user (images, summaries, states, models) get this mode instead.
    """
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename), with
    the user's normal file permissions (:func:`user_file_mode`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), user_file_mode())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files an atomic write of ``path`` leaves behind when its writer is killed
    mid-write (``.<name>.<random>.tmp`` next to it: :func:`atomic_write_bytes`' naming)."""
    path = Path(path)
    prefix = f".{path.name}."
    if not path.parent.is_dir():
        return []
    return sorted(
        p
        for p in path.parent.iterdir()
        if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file()
        if not p.is_symlink()
    )


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete :func:`stale_temp_files` of ``path``; returns what was removed.

    Only for files with a single writer (a training run's checkpoint): a writer running right
    now has a temp file of the same pattern.
    """
    removed = []
    for p in stale_temp_files(path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


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


#: Largest JSON header we parse (as the reference ``safetensors`` library): a bigger claim is a
#: corrupted or hostile file, never a reason to allocate.
MAX_HEADER_BYTES = 100_000_000

TensorSpan = tuple[np.dtype, tuple[int, ...], int, int]


def _int_list(value, n: int | None) -> list[int] | None:
    """``value`` as a list of non-negative Python ints (bools rejected), else None."""
    if not isinstance(value, list) or (n is not None and len(value) != n):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def _parse_entry(name: str, info, dtypes: Mapping[str, np.dtype], source: str) -> TensorSpan:
    if not isinstance(info, dict):
        raise SafetensorsReadError(f"{source}: header entry {name!r} is not a JSON object")
    dtype = dtypes.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise SafetensorsReadError(
            f"{source}: tensor {name!r} has unsupported dtype {info.get('dtype')!r} "
            f"(supported: {sorted(dtypes)})"
        )
    shape = _int_list(info.get("shape"), None)
    offsets = _int_list(info.get("data_offsets"), 2)
    if shape is None or offsets is None:
        raise SafetensorsReadError(
            f"{source}: tensor {name!r} needs a shape of non-negative ints and data_offsets "
            f"[begin, end] of non-negative ints; got shape={info.get('shape')!r}, "
            f"data_offsets={info.get('data_offsets')!r}: the file is corrupted"
        )
    begin, end = offsets
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on absurd shapes
    if end < begin or end - begin != nbytes:
        raise SafetensorsReadError(
            f"{source}: tensor {name!r} (shape {tuple(shape)}, {info['dtype']}) needs {nbytes} "
            f"bytes but data_offsets [{begin}, {end}) span {end - begin}: the file is corrupted"
        )
    return dtype, tuple(shape), begin, end


def parse_safetensors_header(
    header: bytes,
    data_len: int,
    source: str,
    dtypes: Mapping[str, np.dtype] | None = None,
) -> tuple[dict[str, TensorSpan], dict[str, str]]:
    """Parse and validate a safetensors JSON header for a data section of ``data_len`` bytes.

    Returns ``({name: (dtype, shape, begin, end)}, metadata)`` with offsets into the data
    section. Everything the format forbids raises :class:`SafetensorsReadError` naming
    ``source`` before a byte of tensor data is touched: a header that is not a JSON object (or is
    nested absurdly deep), unknown dtypes, negative / non-integer shapes or offsets, offsets that
    disagree with the shape, tensors past the end of the file (truncation), overlapping tensors,
    holes, and trailing bytes (as the reference ``safetensors`` library).
    """
    dtypes = _NAME_DTYPES if dtypes is None else dtypes
    try:
        obj = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SafetensorsReadError(f"{source}: corrupted header ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise SafetensorsReadError(f"{source}: corrupted header (not a JSON object)")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsReadError(f"{source}: corrupted header (__metadata__ must map str to str)")
    entries = {name: _parse_entry(name, info, dtypes, source) for name, info in obj.items()}
    for name, (_, _, _, end) in entries.items():
        if end > data_len:
            raise SafetensorsReadError(
                f"{source}: tensor {name!r} extends past the end of the file (byte {end} of a "
                f"{data_len}-byte data section): truncated or corrupted"
            )
    pos, prev = 0, None
    for begin, end, name in sorted((b, e, n) for n, (_, _, b, e) in entries.items()):
        if begin != pos:
            what = f"overlaps {prev!r}" if begin < pos else f"leaves a hole after byte {pos}"
            raise SafetensorsReadError(
                f"{source}: tensor {name!r} at data_offsets [{begin}, {end}) {what}: the file "
                "is corrupted or hostile"
            )
        pos, prev = end, name
    if pos != data_len:
        raise SafetensorsReadError(
            f"{source}: {data_len - pos} trailing bytes after the last tensor: corrupted"
        )
    return entries, dict(metadata)


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole (small) safetensors file into memory: ``(tensors, metadata)``.

    Raises :class:`SafetensorsReadError` (a ``ValueError``) naming the file on truncation or
    corruption (see :func:`parse_safetensors_header`); sizes are checked against the file's
    before anything is allocated. For large checkpoints use ``weights_conversion.SafetensorsFile``
    (memory-mapped).
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise SafetensorsReadError(f"{path}: no such file") from e
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsReadError(f"{path}: truncated ({len(head)} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise SafetensorsReadError(
                f"{path}: corrupted header (claims {n} header bytes, more than the "
                f"{MAX_HEADER_BYTES} allowed; the file has {size})"
            )
        if 8 + n > size:
            raise SafetensorsReadError(
                f"{path}: truncated or corrupted (header claims {n} bytes, file has {size})"
            )
        raw = f.read()
    entries, metadata = parse_safetensors_header(raw[:n], len(raw) - n, str(path))
    data = memoryview(raw)[n:]
    out = {
        name: np.frombuffer(data[b:e], dtype=dtype).reshape(shape).copy()
        for name, (dtype, shape, b, e) in entries.items()
    }
    return out, metadata
