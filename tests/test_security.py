"""Security: nothing unpickles or evaluates user data, cache index rows cannot reach files outside
the cache directory, and hostile safetensors headers are refused before anything is allocated."""

from __future__ import annotations

import ast
import json
import os
import sqlite3
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from rfmpc.cache import CacheEntryError, CacheIndexError, CacheWarning, DiskCacheStore
from rfmpc.cli import main
from rfmpc.flow import TrajectoryState, flowmatch_sigmas
from rfmpc.flow.state import StateFileError
from rfmpc.io import MAX_HEADER_BYTES, SafetensorsReadError, load_safetensors, save_safetensors
from weights_conversion.safetensors_io import SafetensorsFile, WeightLoadError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("rfmpc", "weights_conversion")

# ---------------------------------------------------------------------------- (a) AST scan
#: modules whose whole purpose is deserialising code or objects
_BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
#: builtins that run code given as data
_BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}
#: ``module.function`` calls that unpickle (resolved through import aliases)
_BANNED_CALLS = {
    "torch.load",
    "joblib.load",
    "pandas.read_pickle",
    "numpy.lib.format.read_array",  # pickles object arrays unless allow_pickle=False
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
}
_NUMPY_LOADS = {"numpy.load"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module path, from every import in the file."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _unsafe_nodes(source: str, filename: str = "<snippet>") -> list[str]:
    """Every unsafe deserialisation / code execution in ``source`` (comments, docstrings and
    other strings are not code, so they never count)."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found = []

    def hit(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _BANNED_MODULES:
                    hit(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in _BANNED_MODULES:
                hit(node, f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _BANNED_BUILTINS and f.id not in aliases:
                hit(node, f"{f.id}(...)")
                continue
            name = _dotted(f, aliases)
            if name is None:
                continue
            if name.replace("np.", "numpy.", 1) in _BANNED_CALLS or name in _BANNED_CALLS:
                hit(node, f"{name}(...)")
            elif name.startswith("builtins.") and name.split(".", 1)[1] in _BANNED_BUILTINS:
                hit(node, f"{name}(...)")
            elif name.replace("np.", "numpy.", 1) in _NUMPY_LOADS:
                for kw in node.keywords:
                    safe = isinstance(kw.value, ast.Constant) and kw.value.value is False
                    if kw.arg == "allow_pickle" and not safe:
                        hit(node, f"{name}(allow_pickle=...)")
                    if kw.arg is None:  # **kwargs could smuggle allow_pickle=True
                        hit(node, f"{name}(**kwargs)")
    return found


def _sources():
    for top in SCANNED:
        yield from sorted((ROOT / top).rglob("*.py"))


def test_scanner_catches_every_pattern_and_ignores_text():
    """The scan is not vacuous: each banned pattern in code is found, the same words in comments,
    docstrings and strings, or as methods of other objects (``module.eval()``), are not."""
    bad = {
        "import pickle": 1,
        "import dill as d": 1,
        "from pickle import loads": 1,
        "import torch\ntorch.load('w.pt')": 1,
        "import torch as T\nT.load(f, weights_only=True)": 1,
        "from torch import load\nload(f)": 1,
        "import numpy as np\nnp.load(f, allow_pickle=True)": 1,
        "import numpy\nnumpy.load(f, allow_pickle=flag)": 1,
        "from numpy import load\nload(f, allow_pickle=True)": 1,
        "import numpy as np\nnp.load(f, **kw)": 1,
        "eval(user_text)": 1,
        "exec(code)": 1,
        "import builtins\nbuiltins.eval(s)": 1,
        "import yaml\nyaml.load(s)": 1,
        "import pandas as pd\npd.read_pickle(p)": 1,
    }
    for src, n in bad.items():
        assert len(_unsafe_nodes(src)) == n, src
    good = [
        '"""We never use pickle.loads or torch.load or eval(x)."""',
        "# np.load(f, allow_pickle=True)\nx = 1",
        "s = 'exec(code)'",
        "import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)",
        "model.eval()\nself.exec_count = 1",
        "import jax\njax.numpy.load = None",
    ]
    for src in good:
        assert _unsafe_nodes(src) == [], src


def test_no_unpickling_or_eval_in_the_library():
    files = list(_sources())
    assert len(files) > 30, "the scan found too few files: wrong root?"
    found = []
    for path in files:
        found += _unsafe_nodes(path.read_text(), str(path.relative_to(ROOT)))
    assert found == [], "unsafe deserialisation / code execution:\n" + "\n".join(found)


# ---------------------------------------------------------------------------- (b) cache paths
SIGMAS = flowmatch_sigmas(4)
KW = dict(model_id="tiny", config_hash="c" * 64)


def _state(seed: int, step: int = 2) -> TrajectoryState:
    rng = np.random.default_rng(seed)
    key = jax.random.wrap_key_data(np.array([seed, 7], np.uint32))
    x = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    return TrajectoryState(x, step, SIGMAS, key, {"c": np.float32(seed)})


def _pooled(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).standard_normal(8).astype(np.float32)


def _snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (symlinks not followed): a before/after witness."""
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def cache_and_outside(tmp_path):
    """A cache with two entries, and an ``outside`` directory with valid-looking bait: copies of
    the real blobs (so a store that followed a path there would *successfully* load them) under
    both their own names and orphan-looking names the collector deletes inside a cache."""
    root = tmp_path / "cache"
    with DiskCacheStore(root) as store:
        ids = [store.put(f"p{i}", _pooled(i), {2: _state(i)}, **KW) for i in range(2)]
    outside = tmp_path / "outside"
    outside.mkdir()
    for eid in ids:
        blob = (root / "blobs" / f"{eid}.safetensors").read_bytes()
        (outside / f"{eid}.safetensors").write_bytes(blob)
        (outside / f"{'ab' * 16}.safetensors").write_bytes(blob)  # an "orphan" if inside
        (outside / f".{eid}.safetensors.abcd.tmp").write_bytes(b"temp-looking")
    (outside / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    return root, ids, outside


def _query() -> np.ndarray:
    """Close to entry 0's embedding (cosine ~0.97), but not equal to it."""
    noise = np.random.default_rng(9).standard_normal(8).astype(np.float32)
    return _pooled(0) + 0.25 * noise * np.linalg.norm(_pooled(0)) / np.linalg.norm(noise)


def _tamper_rows(root: Path, bad_ids: list[str], like: str) -> None:
    """Insert index rows (and change-log puts) with ``bad_ids``, copying ``like``'s row but with
    :func:`_query` as embedding, so they are the best match of a lookup for it."""
    con = sqlite3.connect(root / "index.sqlite")
    with con:
        row = con.execute("SELECT * FROM entries WHERE id = ?", (like,)).fetchone()
        q = np.asarray(_query(), "<f4").tobytes()
        for bad in bad_ids:
            con.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (bad, *row[1:7], q, *row[8:]),
            )
            con.execute("INSERT INTO changes (op, entry_id) VALUES ('put', ?)", (bad,))
    con.close()


def test_tampered_index_ids_never_leave_the_cache(cache_and_outside, capsys):
    root, ids, outside = cache_and_outside
    rel = os.path.relpath(outside / "passwd", root)  # ../outside/passwd
    bad = [
        "../../outside/passwd",
        rel,
        str(outside / "passwd"),  # absolute
        str(outside / ids[0]),  # absolute, and a valid blob lives at <that>.safetensors
        f"../../outside/{ids[0]}",  # relative, same
        ids[0].upper(),
        ids[0] + "\x00",
        "",
    ]
    _tamper_rows(root, bad, ids[0])
    before = _snapshot(outside)
    with DiskCacheStore(root) as store:
        for b in bad:
            with pytest.raises(CacheEntryError, match="invalid cache entry id") as e:
                store.get(b)
            assert e.value.kind == "invalid_id"
        with pytest.warns(CacheWarning, match="invalid_id"):  # lookups skip the rows, loudly
            entry, sim = store.nearest(_query(), **KW)
        assert entry.entry_id == ids[0] and 0.9 < sim < 0.999
        assert len(store.problems) == len(bad)
        assert {i.entry_id for i in store.ls()} == set(ids) | set(bad)  # listed, not followed
        report = store.verify()
        assert sorted((p.entry_id, p.kind) for p in report.problems) == sorted(
            (b, "invalid_id") for b in bad
        )
        assert sorted(report.ok) == sorted(ids)
    rc = main(["cache", "verify", "--cache", str(root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and not out["clean"] and len(out["problems"]) == len(bad)
    assert main(["cache", "verify", "--cache", str(root), "--repair"]) == 1
    capsys.readouterr()
    with DiskCacheStore(root) as store:
        assert store.verify().clean and sorted(i.entry_id for i in store.ls()) == sorted(ids)
        _tamper_rows(root, bad, ids[0])
        assert store.clear() == 2 + len(bad)
    assert _snapshot(outside) == before  # nothing outside was deleted or changed


def test_symlinked_blob_is_not_followed(cache_and_outside):
    """A blob replaced by a symlink to a *valid* copy outside: following it would load fine, so
    an error proves the store did not read through it; repair removes the link, not the target."""
    root, ids, outside = cache_and_outside
    blob = root / "blobs" / f"{ids[0]}.safetensors"
    blob.unlink()
    blob.symlink_to(outside / f"{ids[0]}.safetensors")
    (root / "blobs" / ("cd" * 16 + ".safetensors")).symlink_to(outside / "passwd")  # orphan link
    before = _snapshot(outside)
    with DiskCacheStore(root) as store:
        with pytest.raises(CacheEntryError, match="symlink") as e:
            store.get(ids[0])
        assert e.value.kind == "corrupted"
        report = store.verify()
        assert [(p.entry_id, p.kind) for p in report.problems] == [(ids[0], "corrupted")]
        assert report.orphans == ("cd" * 16 + ".safetensors",)
        store.verify(repair=True)
        assert not blob.is_symlink() and not blob.exists()
        assert len(store) == 1 and store.verify().clean
        store.clear()
    assert _snapshot(outside) == before


@pytest.mark.parametrize("name", ["blobs", "index.sqlite", ".lock"])
def test_cache_refuses_its_own_files_as_symlinks(cache_and_outside, name):
    """``blobs/`` linked elsewhere would make orphan collection and ``clear`` delete files
    there (the bait names look like orphans); the store refuses to open instead."""
    root, _, outside = cache_and_outside
    target = root / name
    moved = outside / f"moved-{name}"
    target.rename(moved)
    target.symlink_to(moved)
    before = _snapshot(outside)
    with pytest.raises(CacheIndexError, match="symbolic link"):
        DiskCacheStore(root)
    assert main(["cache", "verify", "--cache", str(root)]) == 1  # "DAMAGED INDEX: ..."
    assert main(["cache", "clear", "--cache", str(root)]) == 2  # refused with the message
    assert _snapshot(outside) == before


def test_cli_clear_refuses_symlinked_blobs(cache_and_outside, capsys):
    root, _, outside = cache_and_outside
    (root / "blobs").rename(outside / "moved")
    (root / "blobs").symlink_to(outside)  # the bait orphans sit right there
    before = _snapshot(outside)
    assert main(["cache", "clear", "--cache", str(root)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert _snapshot(outside) == before


# ---------------------------------------------------------------------------- (c) headers
def _file(tmp_path: Path, header, data: bytes = b"", *, claim: int | None = None) -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / f"h{len(list(tmp_path.iterdir()))}.safetensors"
    p.write_bytes(struct.pack("<Q", len(hb) if claim is None else claim) + hb + data)
    return p


def _t(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "huge header length": (b"{}", b"", 2**63, "header"),
    "header length past EOF": (b"{}", b"", 4096, "truncated"),
    "header over the cap": (b"{}", b"", MAX_HEADER_BYTES + 1, "header"),
    "not an object": (b"[1, 2]", b"", None, "not a JSON object"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, b"", None, "corrupted header"),
    "not json": (b"\xff\xfe{", b"", None, "corrupted header"),
    "entry not an object": ({"a": [1, 2]}, b"", None, "not a JSON object"),
    "metadata not str": ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    "unknown dtype": ({"a": _t(dtype="F128")}, bytes(8), None, "unsupported dtype"),
    "negative dim": ({"a": _t(shape=(-2,), offsets=(8, 0))}, bytes(8), None, "non-negative"),
    "float dim": ({"a": _t(shape=(2.0,))}, bytes(8), None, "non-negative"),
    "bool offset": ({"a": _t(offsets=(False, 8))}, bytes(8), None, "non-negative"),
    "negative offset": ({"a": _t(offsets=(-8, 0))}, bytes(8), None, "non-negative"),
    "three offsets": ({"a": {**_t(), "data_offsets": [0, 4, 8]}}, bytes(8), None, "offsets"),
    "end before begin": ({"a": _t(shape=(0,), offsets=(8, 0))}, bytes(8), None, "span"),
    "size mismatch": ({"a": _t(offsets=(0, 4))}, bytes(8), None, "needs 8 bytes"),
    # 2**62 * 2**62 elements wrap to 0 in int64 arithmetic; Python ints do not
    "overflowing shape": (
        {"a": _t(shape=(2**62, 2**62, 0), offsets=(0, 0)), "b": _t(shape=(2**62, 2**62))},
        bytes(8),
        None,
        "needs",
    ),
    "past end": ({"a": _t(shape=(2**40,), offsets=(0, 2**42))}, bytes(8), None, "past the end"),
    "overlap": ({"a": _t(), "b": _t(offsets=(4, 12))}, bytes(12), None, "overlaps 'a'"),
    "same bytes twice": ({"a": _t(), "b": _t()}, bytes(8), None, "overlaps"),
    "hole": ({"a": _t(offsets=(4, 12))}, bytes(12), None, "hole"),
    "trailing bytes": ({"a": _t()}, bytes(16), None, "trailing"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_safetensors_headers_are_refused(tmp_path, case):
    header, data, claim, msg = HOSTILE[case]
    path = _file(tmp_path, header, data, claim=claim)
    with pytest.raises(SafetensorsReadError, match=msg) as e:
        load_safetensors(path)
    assert str(path) in str(e.value)
    with pytest.raises(WeightLoadError, match=msg if case != "huge header length" else "claims"):
        SafetensorsFile(path)
    with pytest.raises(StateFileError, match="cannot read trajectory state"):
        TrajectoryState.load(path)


def test_valid_edge_cases_still_load(tmp_path):
    """Zero-size tensors (sharing an offset), scalars, bf16 and metadata round-trip."""
    import ml_dtypes

    tensors = {
        "empty": np.zeros((0, 3), np.float32),
        "empty2": np.zeros((2, 0), np.int8),
        "scalar": np.array(3, np.int64),
        "bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
    }
    save_safetensors(tmp_path / "ok.safetensors", tensors, {"k": "v"})
    got, meta = load_safetensors(tmp_path / "ok.safetensors")
    assert meta == {"k": "v"} and got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert got[k].tobytes() == v.tobytes()
    f = SafetensorsFile(tmp_path / "ok.safetensors")
    assert f.metadata == {"k": "v"} and sorted(f.keys()) == sorted(tensors)
    assert np.asarray(f.get("bf")).tobytes() == tensors["bf"].tobytes()


def test_hostile_blob_in_the_cache_is_reported_not_loaded(tmp_path):
    """A cache blob replaced by a hostile file (index row updated to match its size and hash,
    as an attacker with write access would) is reported as corrupted, never allocated."""
    root = tmp_path / "c"
    with DiskCacheStore(root) as store:
        eid = store.put("p", _pooled(0), {2: _state(0)}, **KW)
    hb = json.dumps({"a": _t(shape=(2**40,), offsets=(0, 2**42))}).encode()
    blob = struct.pack("<Q", len(hb)) + hb + bytes(8)
    (root / "blobs" / f"{eid}.safetensors").write_bytes(blob)
    import hashlib

    con = sqlite3.connect(root / "index.sqlite")
    with con:
        con.execute(
            "UPDATE entries SET sha256 = ?, nbytes = ? WHERE id = ?",
            (hashlib.sha256(blob).hexdigest(), len(blob), eid),
        )
    con.close()
    with DiskCacheStore(root) as store:
        with pytest.raises(CacheEntryError, match="past the end") as e:
            store.get(eid)
        assert e.value.kind == "corrupted"
        assert [p.kind for p in store.verify().problems] == ["corrupted"]
