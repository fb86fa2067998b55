"""rfmpc's one file-IO module: atomic writes and the safetensors format, read and written.

Every file rfmpc persists (trajectory states, cache blobs, checkpoints, model folders, text
encoders, images, summaries) is written through :func:`atomic_open`: a temporary file in the
same folder, fsync, ``os.replace`` onto the target, fsync the folder; any exception removes the
temporary file. A crash leaves either the old file or the new one, never a torn one, and the new
file gets the user's normal permissions (:func:`user_file_mode`, what ``open()`` would create).

Safetensors (an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}``, then raw little-endian bytes) has one implementation here:

- :data:`DTYPES`: the dtype table (bf16 through ``ml_dtypes``, so no torch is needed);
- :func:`read_safetensors_header`: the header validator (one cap, :data:`MAX_HEADER_BYTES`);
- :class:`SafetensorsFile`: the memory-mapped reader for large checkpoints;
- :func:`load_safetensors`: a small file read whole into memory;
- :func:`write_safetensors`: the streaming writer (one tensor on the host at a time);
  :func:`save_safetensors` writes a dict sorted by name through it.

This module imports nothing from rfmpc, so every layer (models included) may use it. No pickle
anywhere: tensors go to safetensors, metadata to JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "DTYPES",
    "MAX_HEADER_BYTES",
    "SafetensorsFile",
    "SafetensorsReadError",
    "atomic_open",
    "atomic_write_bytes",
    "load_safetensors",
    "parse_safetensors_header",
    "read_safetensors_header",
    "remove_stale_temp_files",
    "save_safetensors",
    "stale_temp_files",
    "tensors_digest",
    "user_file_mode",
    "write_safetensors",
]

#: The safetensors dtype codes rfmpc reads and writes, and their numpy dtypes.
DTYPES: Mapping[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}

#: Largest JSON header rfmpc parses (the reference ``safetensors`` library's cap): a bigger claim
#: is a corrupted or hostile file, never a reason to allocate.
MAX_HEADER_BYTES = 100_000_000
_ADVICE = "re-download or re-save the file"


# ---------------------------------------------------------------------------- atomic writes
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

    :func:`atomic_open` goes through ``tempfile.mkstemp``, which creates 0600 files; every file
    rfmpc writes for the user (images, summaries, states, models, caches) gets this mode instead.
    """
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for writing (binary) so that it appears whole or not at all.

    Yields a temporary file ``.<name>.<random>.tmp`` in the same folder (created with its
    parents if needed), with the user's normal permissions (:func:`user_file_mode`). When the
    ``with`` block ends normally the file is flushed and fsynced, renamed onto ``path``
    (``os.replace``) and the folder is fsynced; on any exception the temporary file is removed,
    ``path`` keeps its old content and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            os.fchmod(f.fileno(), user_file_mode())  # mkstemp makes 0600
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files an atomic write of ``path`` leaves behind when its writer is killed
    mid-write (``.<name>.<random>.tmp`` next to it: :func:`atomic_open`'s naming)."""
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


# ---------------------------------------------------------------------------- the writer
def _code(name: str, dtype: np.dtype) -> str:
    code = _CODES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if code is None:
        raise TypeError(
            f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors (supported: "
            f"{', '.join(str(d) for d in DTYPES.values())})"
        )
    return code


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, Any]] | Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array: numpy, jax or anything ``np.asarray`` takes) as one
    safetensors file, atomically (:func:`atomic_open`), in the order given.

    Streaming: the header is built from shapes and dtypes alone, then each array is fetched to
    the host and written in turn, so at most one tensor's host copy exists at a time. Every
    dtype of :data:`DTYPES` (bfloat16 included) is supported; ``metadata`` values must be str.
    """
    items = [
        (name, arr if hasattr(arr, "shape") and hasattr(arr, "dtype") else np.asarray(arr))
        for name, arr in (tensors.items() if isinstance(tensors, Mapping) else tensors)
    ]
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata keys and values must be str; not for {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr in items:
        if not isinstance(name, str) or name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {name!r} is not a str, is reserved or is repeated")
        dtype = np.dtype(arr.dtype)
        shape = [int(s) for s in arr.shape]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _code(name, dtype),
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, arr in items:
            host = np.asarray(arr)
            if host.dtype.byteorder == ">":  # safetensors is little-endian
                host = host.astype(host.dtype.newbyteorder("<"))
            f.write(np.ascontiguousarray(host).reshape(-1).view(np.uint8).data)


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically save a dict of arrays (incl. bfloat16) as a safetensors file, sorted by name."""
    write_safetensors(path, sorted(tensors.items()), metadata)


# ---------------------------------------------------------------------------- the readers
class SafetensorsReadError(ValueError):
    """A safetensors file is missing, truncated or corrupted."""


TensorSpan = tuple[np.dtype, tuple[int, ...], int, int]


def _int_list(value, n: int | None) -> list[int] | None:
    """``value`` as a list of non-negative Python ints (bools rejected), else None."""
    if not isinstance(value, list) or (n is not None and len(value) != n):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return value


def _parse_entry(name: str, info, source: str) -> TensorSpan:
    if not isinstance(info, dict):
        raise SafetensorsReadError(f"{source}: header entry {name!r} is not a JSON object")
    dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise SafetensorsReadError(
            f"{source}: tensor {name!r} has unsupported dtype {info.get('dtype')!r} "
            f"(supported: {sorted(DTYPES)})"
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
) -> tuple[dict[str, TensorSpan], dict[str, str]]:
    """Parse and validate a safetensors JSON header for a data section of ``data_len`` bytes.

    Returns ``({name: (dtype, shape, begin, end)}, metadata)`` with offsets into the data
    section. Everything the format forbids raises :class:`SafetensorsReadError` naming
    ``source`` before a byte of tensor data is touched: a header that is not a JSON object (or is
    nested absurdly deep), unknown dtypes, negative / non-integer shapes or offsets, offsets that
    disagree with the shape, tensors past the end of the file (truncation), overlapping tensors,
    holes, and trailing bytes (as the reference ``safetensors`` library).
    """
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
    entries = {name: _parse_entry(name, info, source) for name, info in obj.items()}
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


def read_safetensors_header(
    f: BinaryIO, size: int, source: str
) -> tuple[dict[str, TensorSpan], dict[str, str], int]:
    """Read and validate the header of the safetensors file ``f`` (positioned at its start,
    ``size`` bytes long): ``(entries, metadata, data_start)``.

    The one header check of every reader: the length prefix must be present, at most
    :data:`MAX_HEADER_BYTES` and inside the file, then :func:`parse_safetensors_header`. Raises
    :class:`SafetensorsReadError` naming ``source`` before anything is allocated.
    """
    head = f.read(8)
    if len(head) < 8:
        raise SafetensorsReadError(
            f"{source}: truncated ({len(head)} bytes, no header): not a whole safetensors file; "
            f"{_ADVICE}"
        )
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise SafetensorsReadError(
            f"{source}: corrupted header: it claims {n} header bytes, more than the "
            f"{MAX_HEADER_BYTES} allowed (MAX_HEADER_BYTES), in a {size}-byte file: the file is "
            f"corrupted or not a safetensors file; {_ADVICE}"
        )
    if 8 + n > size:
        raise SafetensorsReadError(
            f"{source}: truncated or corrupted (header claims {n} bytes, file has {size}); "
            f"{_ADVICE}"
        )
    header = f.read(n)
    if len(header) < n:  # the file shrank under us
        raise SafetensorsReadError(f"{source}: truncated while reading its header; {_ADVICE}")
    try:
        entries, metadata = parse_safetensors_header(header, size - 8 - n, source)
    except SafetensorsReadError as e:
        raise SafetensorsReadError(f"{e}; {_ADVICE}") from None
    return entries, metadata, 8 + n


def _open_for_reading(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise SafetensorsReadError(f"{path}: no such file") from e


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole (small) safetensors file into memory: ``(tensors, metadata)``.

    Raises :class:`SafetensorsReadError` (a ``ValueError``) naming the file on truncation or
    corruption (:func:`read_safetensors_header`); sizes are checked against the file's before
    anything is allocated. The file is read through one descriptor, so a concurrent
    ``os.replace`` of it gives the old or the new content, never a mix. For large checkpoints
    use :class:`SafetensorsFile` (memory-mapped).
    """
    path = Path(path)
    with _open_for_reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        entries, metadata, start = read_safetensors_header(f, size, str(path))
        data = f.read()
    if len(data) != size - start:
        raise SafetensorsReadError(f"{path}: changed size while being read")
    view = memoryview(data)
    out = {
        name: np.frombuffer(view[b:e], dtype=dtype).reshape(shape).copy()
        for name, (dtype, shape, b, e) in entries.items()
    }
    return out, metadata


class SafetensorsFile:
    """One safetensors file: header validated eagerly, tensors memory-mapped on demand.

    Holds no open file between calls; :meth:`get` checks that the file on disk is still the
    one whose header was read (same device, inode and size), so a file replaced meanwhile is an
    error, never a tensor cut from the wrong bytes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with _open_for_reading(self.path) as f:
            st = os.fstat(f.fileno())
            entries, metadata, start = read_safetensors_header(f, st.st_size, str(self.path))
        self._identity = (st.st_dev, st.st_ino, st.st_size)
        self._data_start = start
        self.metadata: dict[str, str] = metadata
        self._entries: dict[str, TensorSpan] = entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy memmap view (no copy until used)."""
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return np.zeros(shape, dtype)
        with _open_for_reading(self.path) as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino, st.st_size) != self._identity:
                raise SafetensorsReadError(
                    f"{self.path}: replaced or rewritten on disk since its header was read; "
                    "open it again"
                )
            mm = np.memmap(
                f, dtype=np.uint8, mode="r", offset=self._data_start + begin, shape=(end - begin,)
            )
        return mm.view(dtype).reshape(shape)
