"""Torch-free, streaming safetensors reading and strict assignment into nnx models.

Format-neutral and model-free: both rfmpc's own format (:mod:`rfmpc.models.serialization`) and
the diffusers / transformers key maps (the top-level ``weights_conversion`` package, which
re-exports these names as ``weights_conversion.safetensors_io``) read checkpoints through it, so
the models never import the conversion package.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping tensor
names to ``{dtype, shape, data_offsets}``, then raw little-endian bytes. :mod:`rfmpc.io` parses
it (one dtype table, one header validator) and memory-maps the data, so bf16 / fp16 / fp32
checkpoints load without torch and without more than one host copy of a tensor at a time
(``safetensors``' numpy backend cannot read bf16).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from rfmpc.io import DTYPES, SafetensorsReadError
from rfmpc.io import SafetensorsFile as _SafetensorsFile

__all__ = [
    "SafetensorsFile",
    "TensorSource",
    "WeightLoadError",
    "find_weight_files",
    "load_into_model",
    "open_folder",
    "release_pages",
]

_FLOAT_DTYPES = frozenset(DTYPES[k] for k in ("F64", "F32", "F16", "BF16"))


class WeightLoadError(ValueError):
    """A checkpoint does not match the model: missing, unmapped or mis-shaped keys, bad files."""


class SafetensorsFile(_SafetensorsFile):
    """One ``.safetensors`` file, memory-mapped (:class:`rfmpc.io.SafetensorsFile`), raising
    :class:`WeightLoadError` on a missing file or an unreadable header."""

    def __init__(self, path: str | os.PathLike):
        if not Path(path).is_file():
            raise WeightLoadError(f"{path}: no such safetensors file")
        try:
            super().__init__(path)
        except SafetensorsReadError as e:
            raise WeightLoadError(str(e)) from e


def find_weight_files(folder: str | os.PathLike, stem: str) -> list[Path]:
    """The safetensors files of ``folder``: ``{stem}.safetensors`` or a sharded index.

    ``stem`` is ``diffusion_pytorch_model`` for diffusers models and ``model`` for transformers.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightLoadError(f"{folder}: not a directory; pass the model's folder")
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightLoadError(f"{index}: not a valid safetensors index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise WeightLoadError(
                f"{index} points to missing shard(s) {missing}; copy them into {folder}"
            )
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {found})" if found else ""
    raise WeightLoadError(
        f"{folder}: neither {single.name} nor {index.name} exists{hint}; "
        "only safetensors checkpoints are supported (convert .bin files with safetensors first)"
    )


class TensorSource(Mapping[str, np.ndarray]):
    """All tensors of one model folder (possibly sharded), tracking which keys were used.

    Key maps call :meth:`take`; :meth:`assert_all_consumed` then raises on any key the map did
    not use, so a checkpoint with extra or renamed tensors never loads silently.
    """

    def __init__(self, files: Iterable[SafetensorsFile]):
        self.files = list(files)
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                if k in self._where:
                    raise WeightLoadError(
                        f"tensor {k!r} appears in both {self._where[k].path} and {f.path}"
                    )
                self._where[k] = f
        self.consumed: set[str] = set()

    @property
    def description(self) -> str:
        return ", ".join(str(f.path) for f in self.files)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key].path

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Fetch ``key`` and mark it used; raise naming the key and file if absent/mis-shaped."""
        if key not in self._where:
            raise WeightLoadError(
                f"missing key {key!r} in {self.description}: the checkpoint does not match the "
                "model config (wrong folder, or a config/weights mismatch)"
            )
        arr = self[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise WeightLoadError(
                f"key {key!r} in {self.file_of(key)} has shape {tuple(arr.shape)}, expected "
                f"{tuple(shape)} from the model config; the weights belong to another config: "
                "use the config.json saved with them"
            )
        if arr.dtype not in _FLOAT_DTYPES:
            raise WeightLoadError(
                f"key {key!r} in {self.file_of(key)} has dtype {arr.dtype}, expected a floating "
                "point weight (F32, F16 or BF16); re-save the checkpoint with float weights"
            )
        self.consumed.add(key)
        return arr

    def assert_all_consumed(self, ignore: Callable[[str], bool] | None = None) -> None:
        left = sorted(
            k for k in self._where if k not in self.consumed and not (ignore and ignore(k))
        )
        if left:
            shown = ", ".join(f"{k!r} ({self.file_of(k).name})" for k in left[:10])
            more = f" and {len(left) - 10} more" if len(left) > 10 else ""
            raise WeightLoadError(
                f"unmapped key(s) {shown}{more} in {self.description}: the checkpoint has "
                "tensors the model does not use; check the config matches the weights"
            )


def open_folder(folder: str | os.PathLike, stem: str) -> TensorSource:
    return TensorSource(SafetensorsFile(p) for p in find_weight_files(folder, stem))


def release_pages(arr) -> None:
    """Drop the file pages behind a memory-mapped tensor from this process (``MADV_DONTNEED``).

    Called once a tensor has been copied into its device array: without it every page of the
    checkpoint stays mapped and counted in the process's resident memory until the whole load
    ends, so the peak would be two copies of the weights (the file's pages + the arrays)
    instead of one. Harmless for non-mapped arrays and on systems without ``madvise``.
    """
    import mmap

    base = arr
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def _path_str(path) -> str:
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))))
    return ".".join(parts)


def load_into_model(
    model, params: Mapping[str, np.ndarray], *, source: str, dtype=None, variables=None
):
    """Assign ``params`` (dotted nnx paths -> arrays, already in rfmpc layout) into ``model``.

    Every variable of the model selected by the nnx filter ``variables`` (default
    ``nnx.Param``; e.g. ``(nnx.Param, Buffer)`` to also fill non-trainable checkpoint buffers)
    must be given exactly once with the right shape; any missing, extra or mis-shaped entry
    raises :class:`WeightLoadError` naming the key, both shapes and ``source``. Arrays are cast
    to ``dtype`` (default: each variable's dtype) one at a time, so the host never holds a
    second full copy of the weights. ``model`` may be abstract (from ``nnx.eval_shape``).
    """
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, nnx.Param if variables is None else variables)
    flat = dict(nnx.to_flat_state(state))
    expected = {_path_str(k): k for k in flat}
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing:
        raise WeightLoadError(
            f"{len(missing)} model parameter(s) not provided by {source}: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
        )
    if extra:
        raise WeightLoadError(
            f"{len(extra)} converted tensor(s) from {source} have no model parameter: {extra[:10]}"
        )
    for name, key in expected.items():
        var = flat[key]
        arr = params[name]
        current = var.get_value()
        want = tuple(current.shape)
        if tuple(arr.shape) != want:
            raise WeightLoadError(
                f"parameter {name!r} from {source}: got shape {tuple(arr.shape)}, model expects "
                f"{want}"
            )
        target = dtype if dtype is not None else current.dtype
        var.set_value(jnp.asarray(np.asarray(arr), dtype=target))
        release_pages(arr)
    nnx.update(model, nnx.from_flat_state(flat))
    return model
