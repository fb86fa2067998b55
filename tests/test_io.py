"""rfmpc.io, the one file-IO module: atomic writes, file modes, the safetensors dtype table,
header cap, streaming writer and readers, and the text encoder's old on-disk format."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import rfmpc.io as rio
import rfmpc.weights_io
from rfmpc.data import PromptTokenizer
from rfmpc.data.text_encoder_io import (
    DEFAULT_TEXT_ENCODER_DIR,
    _flat_params,
    load_text_encoder,
    save_text_encoder,
)
from rfmpc.io import (
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsFile,
    SafetensorsReadError,
    atomic_open,
    atomic_write_bytes,
    load_safetensors,
    save_safetensors,
    stale_temp_files,
    write_safetensors,
)
from rfmpc.models.serialization import WEIGHTS_NAME, load_model, save_model
from rfmpc.models.text_encoder import TextEncoder, TextEncoderConfig
from weights_conversion.safetensors_io import WeightLoadError

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _only(folder: Path, *names: str) -> None:
    """``folder`` holds exactly ``names``: no temp file was left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture(scope="module")
def tokenizer():
    return PromptTokenizer.train()


def _text_encoder(tokenizer) -> TextEncoder:
    cfg = TextEncoderConfig(
        vocab_size=tokenizer.vocab_size, width=32, depth=1, num_heads=2, pooled_dim=16
    )
    return TextEncoder(cfg, rngs=nnx.Rngs(3))


# ---------------------------------------------------------------------------- file modes
def _writers(tokenizer):
    """``name -> write(folder) -> files written``: every writer of the package."""
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}

    def raw(d):
        atomic_write_bytes(d / "x.bin", b"abc")
        return [d / "x.bin"]

    def opened(d):
        with atomic_open(d / "x.bin") as f:
            f.write(b"abc")
        return [d / "x.bin"]

    def saved(d):
        save_safetensors(d / "x.safetensors", t, {"k": "v"})
        return [d / "x.safetensors"]

    def streamed(d):
        write_safetensors(d / "x.safetensors", [("a", jnp.ones((2, 2), jnp.bfloat16))])
        return [d / "x.safetensors"]

    def model(d):
        save_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), d, {"in": 2}, kind="linear")
        return [d / "config.json", d / WEIGHTS_NAME]

    def text_encoder(d):
        save_text_encoder(d, _text_encoder(tokenizer), tokenizer)
        return [d / "config.json", d / "model.safetensors", d / "tokenizer.json"]

    return {
        "atomic_write_bytes": raw,
        "atomic_open": opened,
        "save_safetensors": saved,
        "write_safetensors": streamed,
        "save_model": model,
        "save_text_encoder": text_encoder,
    }


WRITERS = [
    "atomic_write_bytes",
    "atomic_open",
    "save_safetensors",
    "write_safetensors",
    "save_model",
    "save_text_encoder",
]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_gives_the_users_normal_file_mode(tokenizer, tmp_path, writer, mask):
    """What ``open()`` would create under the umask (0666 & ~umask), never mkstemp's 0600 and
    never a fixed 0644, for new files and for files that replace a 0600 one."""
    write = _writers(tokenizer)[writer]
    with _umask(mask):
        assert rio.user_file_mode() == 0o666 & ~mask
        for p in write(tmp_path / "new"):
            assert _mode(p) == 0o666 & ~mask, p
        for p in write(tmp_path / "new"):  # again, over files of another mode
            p.chmod(0o600)
        for p in write(tmp_path / "new"):
            assert _mode(p) == 0o666 & ~mask, p
        assert not list((tmp_path / "new").glob(".*.tmp"))


# ---------------------------------------------------------------------------- interrupted writes
class _Boom(Exception):
    pass


class _Exploding:
    """An array-like whose shape and dtype are known (the header is written) but whose data
    fails to arrive: the streaming writer dies mid-file."""

    shape = (4,)
    dtype = np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        raise _Boom("device lost")


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_atomic_open_interrupted_keeps_the_old_file_and_no_temp_file(tmp_path, exc):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old content")
    with pytest.raises(exc):
        with atomic_open(target) as f:
            f.write(b"new half")
            assert stale_temp_files(target)  # the temp file exists while writing
            raise exc()
    assert target.read_bytes() == b"old content"
    _only(tmp_path, "f.bin")
    assert stale_temp_files(target) == []


def test_streaming_writer_interrupted_mid_file_keeps_the_old_file(tmp_path):
    target = tmp_path / "w.safetensors"
    save_safetensors(target, {"a": np.arange(3, dtype=np.int32)}, {"v": "1"})
    before = target.read_bytes()
    with pytest.raises(_Boom, match="device lost"):
        write_safetensors(target, [("a", np.ones(8, np.float32)), ("b", _Exploding())])
    assert target.read_bytes() == before
    _only(tmp_path, "w.safetensors")
    tensors, meta = load_safetensors(target)
    assert meta == {"v": "1"} and tensors["a"].tolist() == [0, 1, 2]


def test_failed_rename_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "r.bin"
    atomic_write_bytes(target, b"old")

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    _only(tmp_path, "r.bin")


def test_unsupported_dtype_is_refused_before_anything_is_written(tmp_path):
    target = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match=r"'z'.*complex64.*cannot be stored"):
        save_safetensors(target, {"z": np.zeros(2, np.complex64)})
    with pytest.raises(TypeError, match="must be str"):
        save_safetensors(target, {"a": np.zeros(2, np.float32)}, {"k": 1})
    _only(tmp_path)


# ---------------------------------------------------------------------------- header cap
def _claiming(path: Path, n: int) -> Path:
    path.write_bytes(struct.pack("<Q", n) + b"{}")
    return path


def test_header_over_the_cap_is_refused_with_a_clear_message(tmp_path):
    path = _claiming(tmp_path / "huge.safetensors", MAX_HEADER_BYTES + 1)
    for read in (load_safetensors, SafetensorsFile):
        with pytest.raises(SafetensorsReadError) as e:
            read(path)
        msg = str(e.value)
        assert str(path) in msg  # the file
        assert f"{MAX_HEADER_BYTES + 1} header bytes" in msg  # the size it claims
        assert f"{MAX_HEADER_BYTES} allowed" in msg and "MAX_HEADER_BYTES" in msg  # the cap
        assert "re-download or re-save the file" in msg  # what to do
    with pytest.raises(WeightLoadError, match=re.escape(f"{MAX_HEADER_BYTES} allowed")):
        rfmpc.weights_io.SafetensorsFile(path)
    # at the cap the claim is allowed (and then found past the end of this small file)
    path = _claiming(tmp_path / "at.safetensors", MAX_HEADER_BYTES)
    with pytest.raises(SafetensorsReadError, match="truncated"):
        load_safetensors(path)


def test_one_cap_one_table():
    """weights_io and the models' serialization have no table or cap of their own."""
    import rfmpc.models.serialization as ser

    assert MAX_HEADER_BYTES == 100_000_000  # the reference safetensors library's cap
    for mod in (rfmpc.weights_io, ser):
        names = set(vars(mod))
        assert not names & {"_DTYPES", "_CODES", "_MAX_HEADER", "_atomic_write"}, mod
    assert ser.write_safetensors is write_safetensors
    assert issubclass(rfmpc.weights_io.SafetensorsFile, SafetensorsFile)


def test_no_other_module_writes_or_parses_files_itself():
    """fsync, os.replace, mkstemp, the safetensors length prefix and the ``safetensors``
    package appear in rfmpc/io.py only."""
    pattern = re.compile(
        r"os\.fsync\(|os\.replace\(|mkstemp|NamedTemporaryFile|struct\.(un)?pack\(\"<Q\""
        r"|^\s*(import safetensors|from safetensors)",
        re.MULTILINE,
    )
    offenders = []
    for folder in ("rfmpc", "weights_conversion"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p == ROOT / "rfmpc" / "io.py":
                continue
            offenders += [
                f"{p.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(p.read_text())
            ]
    assert offenders == []


# ---------------------------------------------------------------------------- the dtype table
def _sample(dtype: np.dtype) -> np.ndarray:
    if dtype == np.bool_:
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind == "f" or dtype == ml_dtypes.bfloat16:
        info = ml_dtypes.finfo(dtype)
        vals = [0.0, -1.5, float(info.max), float(info.min), float(info.tiny), np.inf]
        return np.array(vals, dtype=dtype).reshape(2, 3)
    info = np.iinfo(dtype)
    return np.array([0, 1, info.max, info.min, 7, info.max - 1], dtype=dtype).reshape(2, 3)


@pytest.mark.parametrize("code", list(DTYPES))
def test_every_dtype_of_the_table_round_trips(tmp_path, code):
    dtype = DTYPES[code]
    tensors = {
        "m": _sample(dtype),
        "scalar": _sample(dtype).reshape(-1)[2].reshape(()),
        "empty": np.zeros((0, 4), dtype),
    }
    path = tmp_path / f"{code}.safetensors"
    save_safetensors(path, tensors, {"code": code})
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert {header[k]["dtype"] for k in tensors} == {code}
    got, meta = load_safetensors(path)
    mapped = SafetensorsFile(path)
    assert meta == mapped.metadata == {"code": code}
    for name, want in tensors.items():
        for arr in (got[name], np.asarray(mapped.get(name))):
            assert arr.dtype == dtype and arr.shape == want.shape
            assert arr.tobytes() == want.tobytes()
        assert mapped.dtype(name) == dtype and mapped.shape(name) == want.shape


def test_streaming_writer_takes_jax_arrays_and_keeps_their_order(tmp_path):
    path = tmp_path / "j.safetensors"
    bf = jnp.linspace(-2, 2, 12, dtype=jnp.bfloat16).reshape(3, 4)
    write_safetensors(path, [("z", bf), ("a", jnp.arange(3, dtype=jnp.int32))])
    f = SafetensorsFile(path)
    assert f.keys() == ["z", "a"]
    assert np.asarray(f.get("z")).tobytes() == np.asarray(bf).tobytes()
    assert f.dtype("z") == ml_dtypes.bfloat16


def test_the_reference_library_reads_what_we_write(tmp_path):
    tensors = {f"t{c}": _sample(d) for c, d in DTYPES.items() if c != "BF16"}
    save_safetensors(tmp_path / "s.safetensors", tensors)
    theirs = safetensors.numpy.load_file(tmp_path / "s.safetensors")
    assert theirs.keys() == tensors.keys()
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and theirs[k].tobytes() == v.tobytes()


def test_mapped_reader_refuses_a_file_replaced_under_it(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors(path, {"a": np.arange(4, dtype=np.float32)})
    f = SafetensorsFile(path)
    save_safetensors(path, {"a": np.arange(4, dtype=np.float32) + 1, "b": np.ones(9, np.int8)})
    with pytest.raises(SafetensorsReadError, match="replaced or rewritten"):
        f.get("a")


def test_model_folder_round_trip_through_the_shared_writer(tmp_path):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16)
    save_model(model, tmp_path, {"n": 3}, kind="linear")
    _only(tmp_path, "config.json", WEIGHTS_NAME)
    loaded, cfg = load_model(
        tmp_path, lambda c: nnx.Linear(c["n"], 2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    )
    assert cfg == {"n": 3}
    assert loaded.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(loaded.kernel[...]), np.asarray(model.kernel[...]))


# ---------------------------------------------------------------------------- text encoder format
def _params(model) -> dict:
    return {
        "/".join(map(str, k)): np.asarray(v[...])
        for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def test_text_encoder_folder_written_by_the_old_code_still_loads(tokenizer, tmp_path):
    """Before rfmpc.io, model.safetensors was ``safetensors.numpy.save(..., {"format": "np"})``
    (the shipped asset too); such folders load unchanged, and the new writer's file is the same
    standard format, read alike by the reference library."""
    model = _text_encoder(tokenizer)
    new, old = tmp_path / "new", tmp_path / "old"
    save_text_encoder(new, model, tokenizer, metadata={"note": "x"})
    old.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (old / name).write_bytes((new / name).read_bytes())
    # the old code path, verbatim
    (old / "model.safetensors").write_bytes(
        safetensors.numpy.save(_flat_params(model), metadata={"format": "np"})
    )
    want = _params(model)
    for folder in (old, new):
        enc = load_text_encoder(folder)
        got = _params(enc.model)
        assert got.keys() == want.keys() and enc.metadata == {"note": "x"}
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    ref_old = safetensors.numpy.load_file(old / "model.safetensors")
    ref_new = safetensors.numpy.load_file(new / "model.safetensors")
    ours_old, meta = load_safetensors(old / "model.safetensors")
    assert meta == {"format": "np"} == load_safetensors(new / "model.safetensors")[1]
    assert ref_old.keys() == ref_new.keys() == ours_old.keys()
    for k in ref_old:
        assert ref_old[k].tobytes() == ref_new[k].tobytes() == ours_old[k].tobytes()


def test_the_shipped_text_encoder_reads_as_before():
    path = DEFAULT_TEXT_ENCODER_DIR / "model.safetensors"
    ours, meta = load_safetensors(path)
    theirs = safetensors.numpy.load_file(path)
    assert meta == {"format": "np"} and ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].tobytes() == theirs[k].tobytes()


def test_unreadable_text_encoder_weights_name_the_file(tokenizer, tmp_path):
    save_text_encoder(tmp_path, _text_encoder(tokenizer), tokenizer)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"not a readable safetensors file.*model\.safetensors"):
        load_text_encoder(tmp_path)
