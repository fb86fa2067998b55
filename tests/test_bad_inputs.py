"""Hostile inputs to every public entry point, as one table (issue 10, "Hardening").

Each row is a bad input to one entry point (Python API or ``rfmpc.cli.main``), the exception it
must raise, and a regex on the message that checks the message names the problem (what was
expected, what was received) and the fix. Rows that would write output also name a path that
must be left exactly as it was (absent, or a directory with unchanged contents): a failed call
writes nothing, not even a partial file.

CLI rows run ``main(argv)``; a non-zero exit becomes :class:`CliExit` with the exit code and
stderr, so their regex starts with ``exit 2:``. Everything expensive is shared per module (the
embedded pipeline is loaded once, weight fixtures are tiny and built with numpy), and every row
fails before any compilation, so the table runs in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rfmpc.pipeline as pipeline_mod
import rfmpc.restore as restore_mod
from rfmpc.cache import (
    CacheEntryError,
    CacheIndexError,
    DiskCacheStore,
    MemoryCacheStore,
    config_hash,
)
from rfmpc.cached import CachedGenerator
from rfmpc.cli import main
from rfmpc.cli.restore import restore_files
from rfmpc.control import (
    LQR,
    MPC,
    OSQP,
    Adaptive,
    Blend,
    Direct,
    Frozen,
    JVPBlocks,
    MultipleShooting,
    Reproject,
    SDEdit,
    Shooting,
    ShootingMPC,
    SwitchCache,
    stack_states,
    switch,
    switch_batch,
)
from rfmpc.convert import ConversionError, convert_folder, load_transformer
from rfmpc.flow import StateFileError, TrajectoryState, flowmatch_sigmas, integrate
from rfmpc.inverse import (
    AveragePool,
    GaussianBlur,
    Identity,
    IsotropicMixtureField,
    box_inpainting,
    make_operator,
    make_solver,
)
from rfmpc.inverse.hexagon import hexagon_field, load_hexagon_mlp, receding_horizon
from rfmpc.pipeline import load_pipeline
from rfmpc.restore import Prior, restore
from weights_conversion.safetensors_io import WeightLoadError

NAN = float("nan")


# ----------------------------------------------------------------------------- shared fixtures
def _velocity(x, sigma, cond):
    """A conditional image field: the exact mixture velocity plus a per-channel shift."""
    return _MIXTURE(x, sigma) + cond["shift"]


_MIXTURE = IsotropicMixtureField(
    np.random.default_rng(0).standard_normal((3, 8, 8, 3)).astype(np.float32) * 0.5, 0.1
)
_SIGMAS = flowmatch_sigmas(6, 1.0)
_KEY = jax.random.key(1)
_X = jax.random.normal(_KEY, (1, 8, 8, 3))
COND_A = {"shift": jnp.zeros((1, 1, 1, 3))}
COND_B = {"shift": jnp.full((1, 1, 1, 3), 0.1)}
STATE = TrajectoryState(x=_X, step=2, sigmas=_SIGMAS, key=_KEY, cond=COND_A)
Y = jnp.zeros((1, 8, 8, 3))

#: A tiny diffusers SD3 transformer config (width 16 = 2 heads x 8, one block).
TINY_MMDIT = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=12,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"
FIRST_KEY = "context_embedder.bias"  # the first diffusers key in sorted order, shape (16,)
PIPELINE_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _diffusers_tensors() -> dict[str, np.ndarray]:
    """Random tensors under every diffusers key and shape of the tiny MM-DiT (no torch)."""
    from flax import nnx

    from rfmpc.models.configs import MMDiTConfig
    from rfmpc.models.mmdit import MMDiT
    from weights_conversion.mmdit import diffusers_key_map

    cfg = MMDiTConfig.from_diffusers(TINY_MMDIT)
    model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    return {
        key: rng.standard_normal(shape).astype(np.float32)
        for key, shape, _ in diffusers_key_map(model).values()
    }


class Ctx:
    """Shared, lazily built resources; ``tmp`` is the current row's own empty directory."""

    def __init__(self, root: Path):
        self.root = root
        self.tmp = root
        self._pipe = None
        self._tensors = None
        self.opened: list[DiskCacheStore] = []

    @property
    def pipe(self):
        if self._pipe is None:
            self._pipe = _REAL_LOAD_PIPELINE(None)
        return self._pipe

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            self._tensors = _diffusers_tensors()
        return self._tensors

    def weights(self, mutate: Callable[[Path, dict], None] | None = None, name="transformer"):
        """A diffusers transformer folder under ``tmp``, then ``mutate(folder, tensors)``."""
        from rfmpc.io import save_safetensors

        folder = self.tmp / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(TINY_MMDIT))
        tensors = dict(self.tensors)
        if mutate is not None:
            mutate(folder, tensors)
        if tensors:
            save_safetensors(folder / WEIGHTS, tensors)
        return folder

    def sd3_folder(self, mutate=None) -> Path:
        """A diffusers SD3 pipeline folder whose transformer is ``weights(mutate)`` (the other
        components are empty: loading stops at the transformer)."""
        folder = self.tmp / "sd3"
        folder.mkdir()
        parts = ("transformer", *PIPELINE_PARTS)
        index = {"_class_name": "StableDiffusion3Pipeline"}
        index.update({p: ["diffusers", "X"] for p in parts})
        (folder / "model_index.json").write_text(json.dumps(index))
        for p in PIPELINE_PARTS:
            (folder / p).mkdir()
        self.weights(mutate, name="sd3/transformer")
        return folder

    def cache(self, **kw) -> DiskCacheStore:
        store = DiskCacheStore(self.tmp / "cache", **kw)
        self.opened.append(store)
        return store

    def close(self) -> None:
        while self.opened:
            self.opened.pop().close()

    def image(self, name: str, size, mode: str = "RGB", fill=128) -> str:
        from PIL import Image

        path = self.tmp / name
        Image.new(mode, size, fill).save(path)
        return str(path)


_REAL_LOAD_PIPELINE = load_pipeline


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    c = Ctx(tmp_path_factory.mktemp("bad_inputs"))
    prior = Prior(
        name="test mixture (32x32)",
        field=IsotropicMixtureField(np.zeros((2, 32, 32, 3), np.float32), 0.1),
        image_shape=(32, 32, 3),
    )

    def shared_load(folder=None, **kw):  # the CLI loads the embedded model once per module
        return c.pipe if folder is None else _REAL_LOAD_PIPELINE(folder, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_mod, "load_pipeline", shared_load)
        mp.setattr(restore_mod, "provide_prior", lambda name="embedded": prior)
        c.prior = prior
        yield c


# ----------------------------------------------------------------------------- the table
class CliExit(Exception):
    """``rfmpc.cli.main`` exited non-zero; the message is ``exit CODE: STDERR``."""


def cli(*argv: str) -> int:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse errors
            code = e.code
    if code != 0:
        raise CliExit(f"exit {code}: {err.getvalue()}")
    return code


@dataclasses.dataclass(frozen=True)
class Bad:
    """A bad input: ``prepare(ctx)`` sets up files and returns the failing call.

    ``untouched(ctx)``: a path that the failing call must leave as it was.
    """

    id: str
    area: str
    prepare: Callable[[Ctx], Callable[[], Any]]
    exc: type[BaseException]
    match: str
    untouched: Callable[[Ctx], Path] | None = None


def call(fn, *args, **kwargs):
    """A row without setup: ``prepare`` ignoring the context."""
    return lambda c: lambda: fn(*args, **kwargs)


def pipe_call(*args, **kwargs):
    return lambda c: lambda: c.pipe(*args, **kwargs)


def run_cli(*argv):
    return lambda c: lambda: cli(*argv)


def tmp(c: Ctx) -> Path:
    return c.tmp


def blobs(c: Ctx) -> Path:
    return c.tmp / "cache" / "blobs"


# -- mutations of the tiny diffusers transformer folder
def drop_key(folder, t):
    del t[FIRST_KEY]


def extra_key(folder, t):
    t["foo.weight"] = np.zeros(3, np.float32)


def misshape_key(folder, t):
    t[FIRST_KEY] = np.zeros(17, np.float32)


def int_key(folder, t):
    t[FIRST_KEY] = t[FIRST_KEY].astype(np.int32)


def truncate_file(folder, t):
    from rfmpc.io import save_safetensors

    save_safetensors(folder / WEIGHTS, t)
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    t.clear()


def index_to_missing_shard(folder, t):
    shard = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index = {"metadata": {}, "weight_map": {k: shard for k in t}}
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    t.clear()


def bad_config_json(folder, t):
    (folder / "config.json").write_text("{not json")


def convert_with(mutate):
    def prepare(c):
        src = c.weights(mutate)
        return lambda: convert_folder(src, c.tmp / "out", log=None)

    return prepare


def load_with(mutate):
    def prepare(c):
        src = c.weights(mutate)
        return lambda: load_transformer(src)

    return prepare


def convert_bad_index(c):
    src = c.sd3_folder()
    (src / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline",')
    return lambda: convert_folder(src, c.tmp / "out", log=None)


def convert_into_source(c):
    src = c.weights()
    return lambda: convert_folder(src, src / "converted", log=None)


def convert_over_existing(c):
    src = c.weights()
    (c.tmp / "out").mkdir()
    (c.tmp / "out" / "keep.txt").write_text("mine")
    return lambda: convert_folder(src, c.tmp / "out", log=None)


def load_pipeline_with(mutate):
    def prepare(c):
        folder = c.sd3_folder(mutate)
        return lambda: load_pipeline(folder)

    return prepare


def load_pipeline_bad_index(c):
    folder = c.sd3_folder()
    (folder / "model_index.json").write_text("{")
    return lambda: load_pipeline(folder)


def cli_convert_with(mutate):
    def prepare(c):
        src = c.weights(mutate)
        return lambda: cli("convert", str(src), str(c.tmp / "out"), "--json")

    return prepare


# -- flow core
def save_state_to_dir(c):
    (c.tmp / "states").mkdir()
    return lambda: STATE.save(c.tmp / "states")


def save_state_with_str_cond(c):
    st = STATE.replace(cond={"prompt": "a red circle"})
    return lambda: st.save(c.tmp / "s.safetensors")


def load_truncated_state(c):
    path = c.tmp / "s.safetensors"
    STATE.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    return lambda: TrajectoryState.load(path)


def load_tampered_state(c):
    path = c.tmp / "s.safetensors"
    STATE.save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a tensor byte: same size, valid header, wrong content
    path.write_bytes(bytes(data))
    return lambda: TrajectoryState.load(path)


# -- cache
CHASH = config_hash(num_steps=6, shape=[8, 8, 3])
POOLED = np.ones(8, np.float32)


def cache_put(pooled=POOLED, states=None, **kw):
    def prepare(c):
        store = c.cache(**kw)
        st = {2: STATE} if states is None else states
        return lambda: store.put("a", pooled, st, model_id="m", config_hash=CHASH)

    return prepare


def cache_get_corrupted(c):
    store = c.cache()
    eid = store.put("a", POOLED, {2: STATE}, model_id="m", config_hash=CHASH)
    blob = store.blob_path(eid)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    return lambda: store.get(eid)


def cache_lookup_other_schedule(c):
    store = c.cache()
    store.put("a", POOLED, {2: STATE}, model_id="m", config_hash=CHASH)
    return lambda: store.lookup(POOLED, 8, model_id="m", config_hash=CHASH)


def cache_query_other_encoder(c):
    """A cache filled by one text encoder (8-d pooled), queried with another's (16-d)."""
    store = c.cache()
    store.put("a", POOLED, {2: STATE}, model_id="m", config_hash=CHASH)
    return lambda: store.nearest(np.ones(16), model_id="m", config_hash=CHASH)


def cache_garbage_index(c):
    (c.tmp / "cache").mkdir()
    (c.tmp / "cache" / "index.sqlite").write_bytes(b"this is not a database" * 100)
    return lambda: c.cache()


def switch_from_other_resolution(c):
    """A state cached by a 16x16 model, resumed with the 8x8 field."""
    store = c.cache()
    other = TrajectoryState(
        x=jnp.zeros((1, 16, 16, 3)), step=2, sigmas=_SIGMAS, key=_KEY, cond=COND_A
    )
    eid = store.put("a", POOLED, {2: other}, model_id="m16", config_hash=CHASH)
    state = store.get(eid).states[2]
    return lambda: switch(_velocity, state, COND_B, Direct())


def switch_from_other_model(c):
    """A state cached with another text encoder (conditioning of another width)."""
    other = STATE.replace(cond={"shift": jnp.zeros((1, 1, 1, 3)), "embeds": jnp.zeros((1, 4))})
    return lambda: switch(_velocity, other, COND_B, Blend())


def stacked(n=2, state=STATE):
    return stack_states([state] * n)


def batch_of(tree, n):
    return jax.tree.map(lambda a: jnp.stack([a] * n), tree)


# -- cached generation, controllers, hexagon, benchmark scripts (the newer entry points)
def gen_call(*args, **kw):
    """``CachedGenerator(pipe, MemoryCacheStore(), num_inference_steps=4)(*args, **kw)``."""

    def prepare(c):
        gen = CachedGenerator(c.pipe, MemoryCacheStore(), num_inference_steps=4)
        return lambda: gen(*args, **kw)

    return prepare


def gen_make(**kw):
    return lambda c: lambda: CachedGenerator(c.pipe, kw.pop("store", MemoryCacheStore()), **kw)


def cache_dir_is_a_file(c):
    (c.tmp / "cache").write_text("not a directory")
    return lambda: CachedGenerator(c.pipe, DiskCacheStore(c.tmp / "cache"))


def cache_disk_full(c):
    """``ENOSPC`` while a miss writes its entry: a clear error, no entry, no temp files."""
    store = c.cache()
    gen = CachedGenerator(c.pipe, store, num_inference_steps=4)
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def go():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "fsync", full)
            gen(["a red circle at the top left on a blue background"], seed=0)

    del real
    return go


def cache_dir_read_only(c):
    """A directory the process may not write (``EACCES``; root ignores mode bits, so the
    refusal is simulated where the store creates its blob folder)."""
    real = Path.mkdir

    def refuse(self, *a, **k):
        if self.name == "blobs":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    def go():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, "mkdir", refuse)
            DiskCacheStore(c.tmp / "ro")

    return go


def cache_read_only_on_put(c):
    """The file system turned read-only (``EROFS``) after the store opened: the miss's write
    fails with the fix and leaves no entry."""
    import rfmpc.cache.disk as disk

    store = c.cache()
    gen = CachedGenerator(c.pipe, store, num_inference_steps=4)

    def rofs(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def go():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(disk, "save_safetensors", rofs)
            gen(["a red circle at the top left on a blue background"], seed=0)

    return go


def entry_missing_step(c):
    store = c.cache()
    eid = store.put("a", POOLED, {2: STATE}, model_id="m", config_hash=CHASH)
    return lambda: store.get(eid).state(5)


def hexagon_bad_weights(c):
    from rfmpc.io import save_safetensors

    path = c.tmp / "w.safetensors"
    save_safetensors(path, {"main.0.weight": np.zeros((4, 3), np.float32)})
    return lambda: load_hexagon_mlp(path)


def bench(name: str, *argv: str):
    """``benchmarks/<name>.py``'s ``main(argv)`` (argparse errors exit 2 with a message)."""

    def prepare(c):
        import importlib

        mod = importlib.import_module(f"benchmarks.{name}")

        def go():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    mod.main(list(argv))
                except SystemExit as e:
                    # argparse prints the (terminal-width dependent) usage first: keep the error
                    last = err.getvalue().strip().splitlines()[-1:] or [""]
                    raise CliExit(f"exit {e.code}: {last[0]}") from None

        return go

    return prepare


# -- restore (images)
def restore_image(name, size, mode="RGB", fill=128, **kw):
    def prepare(c):
        path = c.image(name, size, mode, fill)
        out = str(c.tmp / "strip.png")
        return lambda: restore_files(
            c.prior, task="denoise", method="mpc-k1", image=path, out=out, **kw
        )

    return prepare


def restore_garbage_image(c):
    path = c.tmp / "photo.png"
    path.write_text("definitely not a PNG")
    return lambda: restore_files(c.prior, task="denoise", method="mpc-k1", image=str(path))


def cli_restore_image(name, size, mode, fill=0):
    def prepare(c):
        path = c.image(name, size, mode, fill)
        argv = ["restore", "--task", "denoise", "--method", "mpc-k1", "--image", path]
        return lambda: cli(*argv, "--out", str(c.tmp / "strip.png"), "--json")

    return prepare


def cli_generate_bad_out(c):
    return lambda: cli("generate", "--prompt", "a red circle", "--out", str(c.tmp / "grid.txt"))


SOLVER = make_solver("mpc-k1", num_steps=2)
SW = ["switch", "--from", "a red circle", "--to", "a blue circle"]

TABLE: list[Bad] = [
    # ------------------------------------------------------------------ flow core
    Bad("sigmas-zero-steps", "flow", call(flowmatch_sigmas, 0), ValueError,
        r"num_steps must be >= 1, got 0"),
    Bad("sigmas-negative-steps", "flow", call(flowmatch_sigmas, -3), ValueError,
        r"num_steps must be >= 1, got -3"),
    Bad("sigmas-float-steps", "flow", call(flowmatch_sigmas, 2.5), TypeError,
        r"num_steps must be an int, got float"),
    Bad("sigmas-zero-shift", "flow", call(flowmatch_sigmas, 4, 0.0), ValueError,
        r"shift must be a positive finite number, got 0.0"),
    Bad("sigmas-nan-mu", "flow", call(flowmatch_sigmas, 4, mu=NAN), ValueError,
        r"mu must be a finite number .*got nan; pass mu=None to use shift"),
    Bad("integrate-nan-latent", "flow",
        call(integrate, _velocity, jnp.full((1, 8, 8, 3), jnp.nan), _SIGMAS, COND_A),
        ValueError, r"x \(shape \(1, 8, 8, 3\)\) contains NaN or inf; start from finite noise"),
    Bad("integrate-int-latent", "flow",
        call(integrate, _velocity, jnp.zeros((1, 8, 8, 3), jnp.int32), _SIGMAS, COND_A),
        TypeError, r"x must be a floating-point latent, got dtype int32; convert it with"),
    Bad("integrate-wrong-shape", "flow",
        call(integrate, _velocity, jnp.zeros((1, 4, 4, 3)), _SIGMAS, COND_A), ValueError,
        r"velocity field cannot take x of shape \(1, 4, 4, 3\) \(ValueError: x must have shape "
        r"\(b, \*\(8, 8"),
    Bad("integrate-stop-out-of-range", "flow", call(integrate, _velocity, STATE, stop=9),
        ValueError, r"stop=9 is out of range: it must satisfy start=2 <= stop <= 6"),
    Bad("integrate-negative-start", "flow",
        call(integrate, _velocity, _X, _SIGMAS, COND_A, start=-1), ValueError,
        r"start=-1 is out of range: the grid has steps 0\.\.6"),
    Bad("integrate-increasing-grid", "flow",
        call(integrate, _velocity, _X, _SIGMAS[::-1], COND_A), ValueError,
        r"must be strictly decreasing .*build the grid with flowmatch_sigmas"),
    Bad("integrate-control-shape", "flow",
        call(integrate, _velocity, STATE, control=jnp.zeros((2, 1, 8, 8, 3))), ValueError,
        r"control array has shape \(2, 1, 8, 8, 3\); expected .* = \(4, 1, 8, 8, 3\)"),
    Bad("integrate-foreign-grid", "flow",
        call(integrate, _velocity, STATE, flowmatch_sigmas(6, 3.0)), ValueError,
        r"sigmas differs from the state's own grid.*\(omit sigmas=\)"),
    Bad("state-step-past-end", "flow", call(TrajectoryState, _X, 9, _SIGMAS), ValueError,
        r"step=9 is outside the grid's steps 0\.\.6 .*pass the number of Euler steps"),
    Bad("state-negative-step", "flow", call(TrajectoryState, _X, -1, _SIGMAS), ValueError,
        r"step=-1 is outside the grid's steps 0\.\.6"),
    Bad("state-2d-sigmas", "flow", call(TrajectoryState, _X, 0, jnp.ones((2, 3))), ValueError,
        r"sigmas must be a 1-D grid of >= 2 entries, got \(2, 3\)"),
    Bad("state-save-to-directory", "flow", save_state_to_dir, ValueError,
        r"is a directory; pass a file path such as .*state\.safetensors", tmp),
    Bad("state-save-string-cond", "flow", save_state_with_str_cond, TypeError,
        r"cannot save conditioning leaf of type str: use arrays inside", tmp),
    Bad("state-load-truncated", "flow", load_truncated_state, StateFileError,
        r"truncated.*discard it and save the state again"),
    Bad("state-load-bad-checksum", "flow", load_tampered_state, StateFileError,
        r"checksum mismatch .*discard it and re-run from an earlier state"),
    # ------------------------------------------------------------------ pipeline
    Bad("pipe-empty-prompt-list", "pipeline", pipe_call([], seed=0), ValueError,
        r"prompt is an empty list; give at least one prompt"),
    Bad("pipe-prompt-none", "pipeline", pipe_call(None, seed=0), TypeError,
        r"prompt must be a string or a list of strings, got NoneType"),
    Bad("pipe-zero-steps", "pipeline", pipe_call("a", num_inference_steps=0, seed=0),
        ValueError, r"num_inference_steps must be an int >= 1, got 0"),
    Bad("pipe-negative-steps", "pipeline", pipe_call("a", num_inference_steps=-2, seed=0),
        ValueError, r"num_inference_steps must be an int >= 1, got -2"),
    Bad("pipe-float-steps", "pipeline", pipe_call("a", num_inference_steps=2.5, seed=0),
        ValueError, r"num_inference_steps must be an int >= 1, got 2\.5"),
    Bad("pipe-negative-guidance", "pipeline", pipe_call("a", guidance_scale=-1.0, seed=0),
        ValueError, r"guidance_scale must be a finite number >= 0, got -1\.0"),
    Bad("pipe-nan-guidance", "pipeline", pipe_call("a", guidance_scale=NAN, seed=0),
        ValueError, r"guidance_scale must be a finite number >= 0, got nan"),
    Bad("pipe-height-not-multiple", "pipeline", pipe_call("a", height=30, seed=0), ValueError,
        r"height and width must be multiples of 4 .*got 30x32"),
    Bad("pipe-zero-height", "pipeline", pipe_call("a", height=0, seed=0), ValueError,
        r"height must be a positive number of pixels, got 0; pass None for the model's default"),
    Bad("pipe-negative-width", "pipeline", pipe_call("a", width=-32, seed=0), ValueError,
        r"width must be a positive number of pixels, got -32"),
    Bad("pipe-latents-wrong-shape", "pipeline",
        pipe_call("a", latents=jnp.zeros((1, 16, 16, 3))), ValueError,
        r"latents must have shape \(1, 32, 32, 3\) \(NHWC\) .*got \(1, 16, 16, 3\)"),
    Bad("pipe-nan-latents", "pipeline",
        pipe_call("a", latents=jnp.full((1, 32, 32, 3), jnp.inf)), ValueError,
        r"latents contain NaN or inf; pass finite noise"),
    Bad("pipe-int-latents", "pipeline",
        pipe_call("a", latents=jnp.zeros((1, 32, 32, 3), jnp.int32)), TypeError,
        r"latents must be floating-point noise, got dtype int32; pass"),
    Bad("pipe-unknown-output-type", "pipeline", pipe_call("a", seed=0, output_type="png"),
        ValueError, r"output_type must be 'np', 'pil' or 'latent', got 'png'"),
    Bad("pipe-state-step-out-of-range", "pipeline",
        pipe_call("a", seed=0, num_inference_steps=2, return_states=(99,)), ValueError,
        r"return_states must be steps in \[0, 2\], got \[99\]"),
    Bad("pipe-no-randomness", "pipeline", pipe_call("a"), ValueError,
        r"give seed=, key= or latents= \(randomness is explicit\)"),
    Bad("pipe-int-key", "pipeline", pipe_call("a", key=0), TypeError,
        r"key must be a jax PRNG key array, got int; pass key=jax\.random\.key"),
    Bad("pipe-negative-prompt-count", "pipeline",
        pipe_call(["a"], negative_prompt=["b", "c"], seed=0), ValueError,
        r"negative_prompt has 2 entries but prompt has 1; give one negative prompt or one per"),
    # ------------------------------------------------------------------ weight loaders
    Bad("load-missing-key", "weights", load_with(drop_key), WeightLoadError,
        r"missing key 'context_embedder\.bias' in .*does not match the model config "
        r"\(wrong folder, or a config/weights mismatch\)"),
    Bad("load-extra-key", "weights", load_with(extra_key), WeightLoadError,
        r"unmapped key\(s\) 'foo\.weight' .*check the config matches the weights"),
    Bad("load-misshaped-key", "weights", load_with(misshape_key), WeightLoadError,
        r"'context_embedder\.bias' .* has shape \(17,\), expected \(16,\) from the model "
        r"config; .*use the config\.json saved with them"),
    Bad("load-int-weights", "weights", load_with(int_key), WeightLoadError,
        r"'context_embedder\.bias' .* has dtype int32, expected a floating point weight .*"
        r"re-save the checkpoint"),
    Bad("load-truncated-safetensors", "weights", load_with(truncate_file), WeightLoadError,
        r"truncated.*re-download or re-save"),
    Bad("load-index-missing-shard", "weights", load_with(index_to_missing_shard),
        WeightLoadError, r"points to missing shard\(s\) \['diffusion_pytorch_model-00001-of-"
        r"00002\.safetensors'\]; copy them into"),
    Bad("load-bad-config-json", "weights", load_with(bad_config_json), WeightLoadError,
        r"config\.json: not valid JSON .*restore the config\.json saved with these weights"),
    Bad("load-pipeline-misshaped-key", "weights", load_pipeline_with(misshape_key),
        WeightLoadError, r"has shape \(17,\), expected \(16,\) .*use the config\.json saved"),
    Bad("load-pipeline-bad-index", "weights", load_pipeline_bad_index, ValueError,
        r"model_index\.json is not valid JSON: .*restore it from the original download"),
    Bad("load-pipeline-missing-folder", "weights", call(load_pipeline, "/nonexistent/sd3"),
        FileNotFoundError, r"no such model folder; pass a local diffusers "
        r"StableDiffusion3Pipeline folder, or None"),
    Bad("convert-missing-key", "weights", convert_with(drop_key), WeightLoadError,
        r"missing key 'context_embedder\.bias'", tmp),
    Bad("convert-misshaped-key", "weights", convert_with(misshape_key), WeightLoadError,
        r"has shape \(17,\), expected \(16,\)", tmp),
    Bad("convert-truncated-safetensors", "weights", convert_with(truncate_file),
        WeightLoadError, r"truncated.*re-download or re-save", tmp),
    Bad("convert-index-missing-shard", "weights", convert_with(index_to_missing_shard),
        WeightLoadError, r"points to missing shard", tmp),
    Bad("convert-bad-model-index", "weights", convert_bad_index, ConversionError,
        r"model_index\.json is not valid JSON .*restore it from the original download", tmp),
    Bad("convert-into-source", "weights", convert_into_source, ConversionError,
        r"is inside the source folder .*pick a folder outside it", tmp),
    Bad("convert-over-existing", "weights", convert_over_existing, ConversionError,
        r"out already exists; pass --overwrite to replace it", tmp),
    # ------------------------------------------------------------------ trajectory cache
    Bad("cache-put-pooled-2d", "cache", cache_put(pooled=np.ones((2, 8))), ValueError,
        r"pooled must be a \(d,\) or \(1, d\) embedding, got shape \(2, 8\)", blobs),
    Bad("cache-put-pooled-nan", "cache", cache_put(pooled=np.full(8, np.nan)), ValueError,
        r"pooled must be finite and non-zero \(cosine similarity needs a norm\)", blobs),
    Bad("cache-put-no-states", "cache", cache_put(states={}), ValueError,
        r"states is empty: cache at least one TrajectoryState", blobs),
    Bad("cache-put-step-mismatch", "cache", cache_put(states={3: STATE}), ValueError,
        r"states key 3 differs from that state's step 2", blobs),
    Bad("cache-put-two-grids", "cache",
        cache_put(states={2: STATE, 3: TrajectoryState(_X, 3, flowmatch_sigmas(6, 3.0))}),
        ValueError, r"another sigma grid .*all states share its grid", blobs),
    Bad("cache-put-over-max-bytes", "cache", cache_put(max_bytes=64), ValueError,
        r"exceeds max_bytes=64: raise the limit or cache fewer states", blobs),
    Bad("cache-blob-bad-checksum", "cache", cache_get_corrupted, CacheEntryError,
        r"SHA-256 differs from the index's; run `rfmpc cache verify --repair"),
    Bad("cache-lookup-other-schedule", "cache", cache_lookup_other_schedule, ValueError,
        r"cached on a 6-step grid but num_steps=8: include the schedule"),
    Bad("cache-query-other-encoder", "cache", cache_query_other_encoder, ValueError,
        r"query has 16 dims but entries for model_id='m' have 8: embed the prompt with the "
        r"same encoder"),
    Bad("cache-zero-max-entries", "cache", lambda c: lambda: c.cache(max_entries=0),
        ValueError, r"max_entries must be None or an int >= 1, got 0"),
    Bad("cache-garbage-index", "cache", cache_garbage_index, CacheIndexError,
        r"unreadable cache index .*move the directory away and start a new cache"),
    Bad("cache-state-other-resolution", "cache", switch_from_other_resolution, ValueError,
        r"cannot take state_a\.x of shape \(1, 16, 16, 3\) .*another model or resolution: "
        r"regenerate prompt A with this model"),
    Bad("cache-state-other-model", "cache", switch_from_other_model, ValueError,
        r"cond_b .* does not match state_a\.cond .*encode prompt B with the model"),
    Bad("cache-hash-no-fields", "cache", call(config_hash), ValueError,
        r"config_hash needs at least one field, e\.g\. config_hash\(num_steps=28\)"),
    # ------------------------------------------------------------------ switch controllers
    Bad("switch-not-a-controller", "control",
        call(switch, _velocity, STATE, COND_B, "teleport"), TypeError,
        r"controller must be a controller object such as rfmpc\.control\.Direct\(\) or MPC\(\), "
        r"got str 'teleport'"),
    Bad("switch-not-a-state", "control", call(switch, _velocity, _X, COND_B, Direct()),
        TypeError, r"state_a must be a TrajectoryState, got ArrayImpl"),
    Bad("switch-finished-state", "control",
        call(switch, _velocity, STATE.replace(step=6), COND_B, Direct()), ValueError,
        r"state_a is at step 6 of 6: the trajectory is already finished; decode state_a\.x"),
    Bad("switch-nan-state", "control",
        call(switch, _velocity, STATE.replace(x=jnp.full((1, 8, 8, 3), jnp.nan)), COND_B,
             Direct()),
        ValueError, r"state_a\.x contains NaN or inf.*regenerate prompt A's trajectory"),
    Bad("switch-final-a-shape", "control",
        call(switch, _velocity, STATE, COND_B, SDEdit(),
             cached=SwitchCache(final=jnp.zeros((1, 4, 4, 3)))),
        ValueError, r"cached\.final has shape \(1, 4, 4, 3\); it must be A's final latent, with "
        r"the state's shape \(1, 8, 8, 3\)"),
    Bad("switch-cached-velocity-nan", "control",
        call(switch, _velocity, STATE, COND_B, MPC(),
             cached=SwitchCache(velocity=jnp.full((1, 8, 8, 3), jnp.nan))),
        ValueError, r"cached\.velocity contains NaN or inf: the cache entry is damaged"),
    Bad("switch-cached-not-a-cache", "control",
        call(switch, _velocity, STATE, COND_B, MPC(), cached={"velocity": 1}), TypeError,
        r"cached must be a rfmpc\.control\.SwitchCache, got dict"),
    Bad("switch-cond-b-structure", "control",
        call(switch, _velocity, STATE, {"other": jnp.zeros(3)}, Direct()), ValueError,
        r"cond_b \{'other': \(3,\)\} does not match state_a\.cond \{'shift': \(1, 1, 1, 3\)\}"),
    Bad("switch-similarity-out-of-range", "control",
        call(switch, _velocity, STATE, COND_B, Adaptive(), similarity=1.5), ValueError,
        r"similarity must be a cosine similarity in \[-1, 1\], got 1\.5; omit it"),
    Bad("switch-noise-shape", "control",
        call(switch, _velocity, STATE, COND_B, Direct(), cached=SwitchCache(noise=jnp.zeros(3))),
        ValueError, r"cached\.noise has shape \(3,\); it must be A's seed noise"),
    Bad("switch-no-key-no-noise", "control",
        call(switch, _velocity, STATE.replace(key=None), COND_B, Direct()), ValueError,
        r"state_a has no PRNG key.*pass cached=SwitchCache\(noise=\.\.\.\)"),
    Bad("switch-sdedit-no-key", "control",
        call(switch, _velocity, STATE.replace(key=None), COND_B, SDEdit(),
             cached=SwitchCache(noise=jnp.zeros((1, 8, 8, 3)))), ValueError,
        r"SDEdit needs fresh noise but the state has no PRNG key"),
    Bad("blend-zero-transition", "control", call(Blend, transition_steps=0), ValueError,
        r"transition_steps must be >= 1 \(1 = the direct switch\), got 0"),
    Bad("mpc-zero-horizon", "control", call(MPC, horizon=0), ValueError,
        r"horizon must be an int >= 1, got 0"),
    Bad("mpc-negative-weight", "control", call(MPC, tracking_weight=-1.0), ValueError,
        r"tracking_weight must be a number >= 0, got -1\.0"),
    Bad("mpc-zero-effort", "control", call(MPC, effort_weight=0.0), ValueError,
        r"effort_weight must be > 0 \(it keeps the QP strictly convex\)"),
    Bad("mpc-decay-out-of-range", "control", call(MPC, decay=1.5), ValueError,
        r"decay must lie in \[0, 1\], got 1\.5"),
    Bad("mpc-blocks-with-lqr", "control", call(MPC, linearisation=JVPBlocks()), ValueError,
        r"JVPBlocks gives coupled C x C Jacobian blocks.*use solver=OSQP\(\)"),
    Bad("mpc-unknown-target", "control", call(MPC, target="fresh"), ValueError,
        r"target must be one of \('a-implied', 'seed'\), got 'fresh'"),
    Bad("osqp-zero-maxiter", "control", call(OSQP, maxiter=0), ValueError,
        r"maxiter must be an int >= 1, got 0"),
    Bad("shooting-zero-horizon", "control", call(Shooting, horizon=0), ValueError,
        r"horizon must be a positive int or None \(all remaining\), got 0"),
    Bad("shooting-bad-optimizer", "control", call(Shooting, optimizer="lbfgs"), ValueError,
        r"optimizer must be 'adam' or 'sgd', got 'lbfgs'"),
    Bad("shooting-init-shape", "control",
        call(switch, _velocity, STATE, COND_B, Shooting(init_controls=jnp.zeros((2, 3)))),
        ValueError, r"init_controls has shape \(2, 3\); expected \(H, \*x\.shape\)"),
    Bad("switch-batch-not-a-controller", "control",
        lambda c: lambda: switch_batch(_velocity, stacked(), batch_of(COND_B, 2), "x"),
        TypeError, r"controller must be a controller object"),
    Bad("switch-batch-conds-size", "control",
        lambda c: lambda: switch_batch(_velocity, stacked(), batch_of(COND_B, 3), Direct()),
        ValueError, r"conds_b must be stacked with a leading axis of 2 .*got a leaf of shape "
        r"\(3, 1, 1, 1, 3\); stack per-pair values"),
    Bad("switch-batch-unstacked", "control",
        call(switch_batch, _velocity, STATE, COND_B, Direct()), ValueError,
        r"all states must share one sigma grid \(stack them with stack_states\)"),
    Bad("switch-batch-mixed-steps", "control",
        lambda c: lambda: switch_batch(
            _velocity, stack_states([STATE, STATE.replace(step=3)]), batch_of(COND_B, 2),
            Direct()),
        ValueError, r"all states must be at the same step to batch them, got \[2 3\]; group"),
    Bad("stack-states-mixed-shapes", "control",
        call(stack_states, [STATE, STATE.replace(x=jnp.zeros((1, 4, 4, 3)))]), ValueError,
        r"states\[1\]\.x is \(1, 4, 4, 3\) float32 but states\[0\]\.x is \(1, 8, 8, 3\) "
        r"float32: batch states of one model and resolution"),
    # ------------------------------------------------------------------ cached generation
    Bad("gen-empty-prompts", "cached", gen_call([]), ValueError,
        r"prompts is empty: give at least one prompt"),
    Bad("gen-prompt-not-str", "cached", gen_call([3]), TypeError,
        r"every prompt must be a str, got int"),
    Bad("gen-seed-count", "cached", gen_call(["a", "b"], seed=[1]), ValueError,
        r"seed has 1 entries for 2 prompts: give one int or one seed per prompt"),
    Bad("gen-seed-overflow", "cached", gen_call(["a"], seed=2**64), ValueError,
        r"seed must lie in \[0, 2\*\*63\), got 18446744073709551616"),
    Bad("gen-seed-negative", "cached", gen_call(["a"], seed=-1), ValueError,
        r"seed must lie in \[0, 2\*\*63\), got -1"),
    Bad("gen-seed-float", "cached", gen_call(["a"], seed=1.5), TypeError,
        r"seed must be an int, got 1\.5"),
    Bad("gen-output-type", "cached", gen_call(["a"], output_type="jpg"), ValueError,
        r"output_type must be 'np', 'pil' or 'latent', got 'jpg'"),
    Bad("gen-unknown-words-strict", "cached", gen_call(["a zebra eating pizza"], strict=True),
        ValueError, r"outside the embedded model's vocabulary.*\['eating', 'pizza', 'zebra'\]"
        r".*e\.g\. 'a red circle at the top left on a blue background'"),
    Bad("gen-store-not-a-store", "cached", lambda c: lambda: CachedGenerator(c.pipe, "cache"),
        TypeError, r"store must be a cache store \(DiskCacheStore or MemoryCacheStore\), got str"),
    Bad("gen-controller-string", "cached", gen_make(controller="mpc"), TypeError,
        r"controller must be a controller object such as MPC\(\) or Direct\(\), got 'mpc'"),
    Bad("gen-policy-not-policy", "cached", gen_make(policy=0.9), TypeError,
        r"policy must be a ResumePolicy, got float"),
    Bad("gen-one-step", "cached", gen_make(num_inference_steps=1), ValueError,
        r"num_inference_steps must be an int >= 2, got 1"),
    Bad("gen-guidance-nan", "cached", gen_make(guidance_scale=NAN), ValueError,
        r"guidance_scale must be a finite number >= 0, got nan"),
    Bad("gen-store-step-equals-n", "cached", gen_make(num_inference_steps=8, store_steps=[8]),
        ValueError, r"store_steps must be a non-empty list of steps in \[1, 7\], got \[8\]"),
    Bad("gen-bad-bucket", "cached", gen_make(batch_buckets=(0, 4)), ValueError,
        r"batch_buckets must be sizes >= 1, got \(0, 4\)"),
    Bad("gen-cache-dir-is-a-file", "cached", cache_dir_is_a_file, FileNotFoundError,
        r"cache directory .*/cache is not a directory", untouched=lambda c: c.tmp / "cache"),
    Bad("gen-cache-disk-full", "cached", cache_disk_full, OSError,
        r"cache directory .* is full \(No space left on device\) while writing entry "
        r"[0-9a-f]{32}: free space, lower max_bytes or run `rfmpc cache clear`",
        untouched=lambda c: c.tmp / "cache" / "blobs"),
    Bad("gen-cache-dir-read-only", "cached", cache_dir_read_only, PermissionError,
        r"cache directory .*/ro is not writable \(Permission denied\) while opening the cache: "
        r".*fix its permissions or choose a writable directory \(CLI: --cache DIR\)"),
    Bad("gen-cache-read-only-on-put", "cached", cache_read_only_on_put, PermissionError,
        r"cache directory .* is not writable \(Read-only file system\) while writing entry "
        r"[0-9a-f]{32}: .*nothing was written", untouched=lambda c: c.tmp / "cache" / "blobs"),
    Bad("cache-entry-missing-step", "cached", entry_missing_step, KeyError,
        r"caches steps \(2,\), not 5"),
    Bad("cli-generate-cache-controller", "cli",
        run_cli("generate", "--prompt", "a red circle at the top left on a blue background",
                "--controller", "mpc"), CliExit,
        r"exit 2: .*--controller and --min-similarity need --cache DIR"),
    Bad("cli-generate-min-similarity", "cli",
        run_cli("generate", "--prompt", "a", "--cache", "/tmp/x", "--min-similarity", "1.5"),
        CliExit, r"exit 2: .*--min-similarity must lie in \(-1, 1\], got 1\.5"),
    Bad("cli-generate-seed-overflow", "cli",
        run_cli("generate", "--prompt", "a", "--seed", "99999999999999999999"), CliExit,
        r"exit 2: .*--seed must be an integer in \[0, 9223372036854775807\], got 9999"),
    Bad("cli-generate-strict", "cli",
        run_cli("generate", "--prompt", "a zebra eating pizza", "--strict"), CliExit,
        r"exit 2: .*words outside the embedded model's vocabulary.*zebra"),
    Bad("cli-generate-bad-controller", "cli",
        run_cli("generate", "--prompt", "a", "--cache", "/tmp/x", "--controller", "pid"),
        CliExit, r"(?s)exit 2: usage: .*argument --controller: invalid choice: 'pid'"),
    # ------------------------------------------------------------------ controller options
    Bad("blend-bad-mode", "control", call(Blend, mode="latent"), ValueError,
        r"mode must be one of \('velocity', 'cond'\), got 'latent'"),
    Bad("adaptive-thresholds-order", "control", call(Adaptive, text_thresholds=(0.9, 0.95)),
        ValueError, r"text_thresholds must be two decreasing similarities in \[-1, 1\]"),
    Bad("adaptive-zero-length", "control", call(Adaptive, lengths=(0, 1, 2)), ValueError,
        r"lengths must be three ints >= 1, got \(0, 1, 2\)"),
    Bad("reproject-zero-iters", "control", call(Reproject, iters=0), ValueError,
        r"iters must be an int >= 1, got 0"),
    Bad("sdedit-seed-type", "control", call(SDEdit, noise_seed="1"), TypeError,
        r"noise_seed must be an int, got '1'"),
    Bad("mpc-negative-decay", "control", call(MPC, decay=-0.1), ValueError,
        r"decay must lie in \[0, 1\], got -0\.1"),
    Bad("mpc-zero-box", "control", call(MPC, u_max=0.0), ValueError, r"u_max must be > 0, got 0"),
    Bad("mpc-zero-control-steps", "control", call(MPC, control_steps=0), ValueError,
        r"control_steps must be an int >= 1, got 0"),
    Bad("mpc-linearisation-string", "control", call(MPC, linearisation="analytic"), TypeError,
        r"linearisation must be Analytic\(\), Frozen\(\.\.\.\) or JVPBlocks\(\.\.\.\)"),
    Bad("mpc-solver-string", "control", call(MPC, solver="lqr"), TypeError,
        r"solver must be LQR\(\) or OSQP\(\.\.\.\), got 'lqr'"),
    Bad("mpc-command-not-command", "control", call(MPC, command=MPC()), TypeError,
        r"command must be Direct\(\), Blend\(\.\.\.\) or Adaptive\(\.\.\.\)"),
    Bad("osqp-zero-tol", "control", call(OSQP, tol=0.0), ValueError, r"tol must be > 0, got 0"),
    Bad("lqr-zero-kkt-tol", "control", call(LQR, kkt_tol=0.0), ValueError,
        r"kkt_tol must be > 0, got 0"),
    Bad("frozen-zero-probes", "control", call(Frozen, probes=0), ValueError,
        r"probes must be an int >= 1, got 0"),
    Bad("jvp-blocks-zero-stride", "control", call(JVPBlocks, stride=0), ValueError,
        r"stride must be an int >= 1, got 0"),
    Bad("shooting-zero-iters", "control", call(Shooting, max_iter=0), ValueError,
        r"max_iter must be an int >= 1, got 0"),
    Bad("shooting-negative-lr", "control", call(Shooting, learning_rate=-1.0), ValueError,
        r"learning_rate and lr_final must be > 0"),
    Bad("shooting-negative-weight", "control", call(Shooting, effort_weight=-1.0), ValueError,
        r"effort_weight must be >= 0, got -1\.0"),
    Bad("shooting-divergence-ratio", "control", call(Shooting, divergence_ratio=0.5),
        ValueError, r"divergence_ratio must be > 1, got 0\.5"),
    Bad("multiple-shooting-zero-segments", "control", call(MultipleShooting, num_segments=0),
        ValueError, r"num_segments must be an int >= 1, got 0"),
    Bad("shooting-mpc-zero-tol", "control", call(ShootingMPC, replan_tol=0.0), ValueError,
        r"replan_tol must be > 0, got 0"),
    Bad("shooting-mpc-wrong-parts", "control", call(ShootingMPC, shooting=MPC()), TypeError,
        r"shooting must be a Shooting\(\) and mpc an MPC\(\)"),
    Bad("switch-similarity-nan", "control",
        call(switch, _velocity, STATE, COND_B, Adaptive(), similarity=NAN), ValueError,
        r"similarity must be a cosine similarity in \[-1, 1\], got nan"),
    Bad("switch-int-state", "control",
        call(switch, _velocity, STATE.replace(x=jnp.zeros((1, 8, 8, 3), jnp.int32)), COND_B,
             Direct()), TypeError, r"state_a\.x must be a floating-point latent, got dtype int32"),
    Bad("switch-batch-similarity-size", "control",
        lambda c: lambda: switch_batch(_velocity, stacked(), batch_of(COND_B, 2), Adaptive(),
                                       similarity=jnp.ones(3)),
        ValueError, r"similarity must be stacked with a leading axis of 2"),
    Bad("switch-batch-velocity-shape", "control",
        lambda c: lambda: switch_batch(_velocity, stacked(), batch_of(COND_B, 2), MPC(),
                                       cached=SwitchCache(velocity=jnp.zeros((2, 1, 4, 4, 3)))),
        ValueError, r"cached\.velocity has shape \(1, 4, 4, 3\); it must be v_A at the cached "
        r"state"),
    # ------------------------------------------------------------------ the hexagon experiment
    Bad("hexagon-zero-k", "hexagon", call(receding_horizon, hexagon_field(), 0), ValueError,
        r"k \(the horizon's Euler steps\) must be an int >= 1, got 0"),
    Bad("hexagon-nan-start", "hexagon",
        call(receding_horizon, hexagon_field(), 1, (NAN, 0.0)), ValueError,
        r"x0 and target must be finite 2-D points"),
    Bad("hexagon-target-shape", "hexagon",
        call(receding_horizon, hexagon_field(), 1, (0.0, 0.0), (1.0, 2.0, 3.0)), ValueError,
        r"x0 and target must be 2-D points, got shapes \(2,\) and \(3,\)"),
    Bad("hexagon-zero-steps", "hexagon",
        call(receding_horizon, hexagon_field(), 1, num_steps=0), ValueError,
        r"num_steps must be an int >= 1, got 0"),
    Bad("hexagon-wrong-weights", "hexagon", hexagon_bad_weights, ValueError,
        r"is not the hexagon MLP: missing \['main\.0\.bias'"),
    Bad("bench-hexagon-corner", "benchmarks", bench("mpcflow_hexagon", "--corner", "7"),
        CliExit, r"exit 2: .*--corner must index one of the 6 corners \(-6\.\.5\), got 7"),
    Bad("bench-hexagon-ks", "benchmarks", bench("mpcflow_hexagon", "--ks", "1,a"), CliExit,
        r"exit 2: .*--ks must be comma-separated ints, got '1,a'"),
    Bad("bench-hexagon-iters", "benchmarks", bench("mpcflow_hexagon", "--global-iters", "0"),
        CliExit, r"exit 2: .*--global-iters, --steps and --iters must be >= 1"),
    Bad("bench-switch-k", "benchmarks", bench("switch_quality", "--ks", "0,10"), CliExit,
        r"exit 2: .*every k must lie in \(0, 28\)"),
    Bad("bench-switch-seeds", "benchmarks", bench("switch_quality", "--seeds", "0"), CliExit,
        r"exit 2: .*--seeds and --per-kind must be >= 1"),
    Bad("bench-stream-n", "benchmarks", bench("cache_stream", "--n", "4", "--batch", "16"),
        CliExit, r"exit 2: .*--n must be at least twice --batch"),
    # ------------------------------------------------------------------ inverse solvers
    Bad("solver-unknown-method", "inverse", call(make_solver, "magic"), ValueError,
        r"unknown method 'magic'; choose one of \['mpc-rhc'"),
    Bad("solver-unknown-option", "inverse", call(make_solver, "mpc-rhc", bogus=1), TypeError,
        r"unknown option\(s\) \['bogus'\] for method 'mpc-rhc'; valid options: \["),
    Bad("solver-zero-steps", "inverse", call(make_solver, "mpc-rhc", num_steps=0), ValueError,
        r"num_steps must be >= 1, got 0"),
    Bad("solver-zero-noise", "inverse", call(SOLVER, _MIXTURE, Identity(), Y, 0.0, _KEY),
        ValueError, r"noise_std must be > 0 .*got 0\.0; for noiseless data pass a small value"),
    Bad("solver-nan-measurement", "inverse",
        call(SOLVER, _MIXTURE, Identity(), jnp.full((1, 8, 8, 3), jnp.nan), 0.1, _KEY),
        ValueError, r"y contains NaN or inf; give finite measurements"),
    Bad("solver-uint8-measurement", "inverse",
        call(SOLVER, _MIXTURE, Identity(), jnp.zeros((1, 8, 8, 3), jnp.uint8), 0.1, _KEY),
        TypeError, r"y must be a floating-point measurement .*got dtype uint8; for uint8 "
        r"images pass y\.astype"),
    Bad("solver-unbatched-measurement", "inverse",
        call(SOLVER, _MIXTURE, Identity(), Y[0], 0.1, _KEY), ValueError,
        r"must be a batch of NHWC images .*got shape \(8, 8, 3\); add a batch axis"),
    Bad("solver-measurement-wrong-size", "inverse",
        call(SOLVER, _MIXTURE, box_inpainting((8, 8)), jnp.zeros((1, 16, 16, 3)), 0.1, _KEY),
        ValueError, r"spatial size \(16, 16\) but the mask is \(8, 8\)"),
    Bad("solver-measurement-wrong-channels", "inverse",
        call(SOLVER, _MIXTURE, Identity(), jnp.zeros((1, 8, 8, 4)), 0.1, _KEY), ValueError,
        r"velocity field cannot take a state of shape \(1, 8, 8, 4\) .*y must match the "
        r"model's image size and channels"),
    Bad("solver-int-key", "inverse", call(SOLVER, _MIXTURE, Identity(), Y, 0.1, 0), TypeError,
        r"key must be a jax PRNG key, got int; pass jax\.random\.key\(seed\)"),
    Bad("solver-operator-not-operator", "inverse",
        call(SOLVER, _MIXTURE, lambda x: x, Y, 0.1, _KEY), TypeError,
        r"operator must be an rfmpc\.inverse AbstractOperator"),
    Bad("operator-blur-wrong-size", "inverse",
        call(GaussianBlur((8, 8)), jnp.zeros((1, 16, 16, 3))), ValueError,
        r"x has spatial size \(16, 16\); this blur was built for \(8, 8\)"),
    Bad("operator-sr-indivisible", "inverse", call(AveragePool(3), Y), ValueError,
        r"image size 8x8 is not divisible by the SR factor 3"),
    Bad("operator-unknown-task", "inverse", call(make_operator, "paint", (8, 8, 3)),
        ValueError, r"unknown task 'paint'; choose one of \['inpaint-box'"),
    Bad("restore-unknown-task", "inverse",
        lambda c: lambda: restore_files(c.prior, task="bogus", method="mpc-k1",
                                        out=str(c.tmp / "s.png")),
        ValueError, r"unknown task 'bogus'; choose one of \['inpaint-box'", tmp),
    Bad("restore-image-wrong-aspect", "inverse", restore_image("wide.png", (48, 32)),
        ValueError, r"is 48x32 \(width x height\) but the model works on 32x32 images; .*crop "
        r"it to a 32:32 aspect ratio", tmp),
    Bad("restore-image-transparent", "inverse",
        restore_image("rgba.png", (32, 32), "RGBA", (255, 0, 0, 0)), ValueError,
        r"has transparent pixels \(mode RGBA\); flatten it", tmp),
    Bad("restore-image-not-an-image", "inverse", restore_garbage_image, ValueError,
        r"is not a readable image .*pass a PNG file"),
    Bad("restore-negative-noise", "inverse",
        lambda c: lambda: restore(c.prior, task="denoise", method="mpc-k1", noise=-1.0),
        ValueError, r"--noise must be > 0, got -1\.0"),
    Bad("restore-truth-wrong-shape", "inverse",
        lambda c: lambda: restore(c.prior, task="denoise", method="mpc-k1",
                                  truth=np.zeros((1, 16, 16, 3), np.float32)),
        ValueError, r"truth has shape \(1, 16, 16, 3\); the prior works on \(1, 32, 32, 3\).*"
        r"resize or crop it first"),
    Bad("restore-mmse-zero", "inverse",
        lambda c: lambda: restore(c.prior, task="denoise", method="mpc-k1", mmse_samples=0),
        ValueError, r"mmse_samples \(--mmse\) must be an int >= 1 \(1: one sample\), got 0"),
    Bad("restore-mmse-baseline", "inverse",
        lambda c: lambda: restore(c.prior, task="denoise", method="pnp-flow", mmse_samples=4),
        ValueError, r"mmse_samples \(--mmse\) = 4 applies to the MPC-Flow methods .*not to "
        r"'pnp-flow': drop --mmse or pick an mpc-\* method"),
    # ------------------------------------------------------------------ command line
    Bad("cli-generate-zero-steps", "cli", run_cli("generate", "--prompt", "a", "--steps", "0"),
        CliExit, r"exit 2: rfmpc generate: error: num_inference_steps must be an int >= 1, "
        r"got 0"),
    Bad("cli-generate-negative-guidance", "cli",
        run_cli("generate", "--prompt", "a", "--guidance", "-1"), CliExit,
        r"exit 2: .*guidance_scale must be a finite number >= 0, got -1\.0"),
    Bad("cli-generate-zero-height", "cli", run_cli("generate", "--prompt", "a", "--height", "0"),
        CliExit, r"exit 2: .*height must be a positive number of pixels, got 0"),
    Bad("cli-generate-out-not-png", "cli", cli_generate_bad_out, CliExit,
        r"exit 2: .*grid\.txt: images are written as PNG; give a path ending in \.png", tmp),
    Bad("cli-generate-steps-not-int", "cli",
        run_cli("generate", "--prompt", "a", "--steps", "abc"), CliExit,
        r"(?s)exit 2: usage: .*argument --steps: invalid int value: 'abc'"),
    Bad("cli-generate-missing-model", "cli",
        run_cli("generate", "--prompt", "a", "--model", "/nonexistent/sd3"), CliExit,
        r"exit 2: .*no such model folder; pass a local diffusers"),
    Bad("cli-convert-missing-source", "cli", run_cli("convert", "/nonexistent/sd3", "/tmp/x"),
        CliExit, r"exit 2: rfmpc convert: error: /nonexistent/sd3: no such folder"),
    Bad("cli-convert-missing-key", "cli", cli_convert_with(drop_key), CliExit,
        r"exit 2: .*missing key 'context_embedder\.bias'", tmp),
    Bad("cli-switch-step-out-of-range", "cli", run_cli(*SW, "--at", "40", "--steps", "12"),
        CliExit, r"exit 2: .*--at must be in \[1, 11\], got 40"),
    Bad("cli-switch-unknown-method", "cli", run_cli(*SW, "--method", "teleport"), CliExit,
        r"(?s)exit 2: usage: .*argument --method: invalid choice: 'teleport' \(choose from"),
    Bad("cli-switch-one-step", "cli", run_cli(*SW, "--at", "1", "--steps", "1"), CliExit,
        r"exit 2: .*--steps must be an int >= 2, got 1"),
    Bad("cli-restore-16bit-image", "cli", cli_restore_image("deep.png", (32, 32), "I;16"),
        CliExit, r"exit 2: .*has mode 'I;16', expected 8-bit RGB.*save it as an 8-bit RGB PNG",
        tmp),
    Bad("cli-restore-negative-noise", "cli",
        run_cli("restore", "--task", "denoise", "--method", "mpc-k1", "--noise", "-1"), CliExit,
        r"exit 2: .*--noise must be > 0, got -1\.0"),
    Bad("cli-restore-unknown-task", "cli",
        run_cli("restore", "--task", "colorize", "--method", "mpc-k1"), CliExit,
        r"(?s)exit 2: usage: .*argument --task: invalid choice: 'colorize'"),
    Bad("cli-restore-mmse-baseline", "cli",
        run_cli("restore", "--task", "denoise", "--method", "d-flow", "--mmse", "3"), CliExit,
        r"exit 2: .*--mmse\) = 3 applies to the MPC-Flow methods"),
    Bad("cli-cache-verify-missing", "cli",
        run_cli("cache", "verify", "--cache", "/nonexistent/cache"), CliExit,
        r"exit 2: .*/nonexistent/cache does not exist or is not an rfmpc cache"),
]  # fmt: skip


def _snapshot(path: Path) -> dict[str, str] | None:
    """Relative path -> SHA-256 of every file under ``path`` (None if it does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(path.rglob("*"))
    }


def test_table_is_broad():
    """At least 45 distinct rows over every area, unique ids."""
    ids = [row.id for row in TABLE]
    assert len(ids) == len(set(ids)) and len(TABLE) >= 45
    areas = {row.area for row in TABLE}
    assert areas == {
        "flow",
        "pipeline",
        "weights",
        "cache",
        "control",
        "inverse",
        "cli",
        "cached",
        "hexagon",
        "benchmarks",
    }


def test_fixtures_are_good(ctx, tmp_path):
    """The fixtures the rows break are valid unbroken: every failure is the mutation's."""
    ctx.tmp = tmp_path
    tr = load_transformer(ctx.weights())
    assert tr.config.num_layers == 1
    out = convert_folder(tmp_path / "transformer", tmp_path / "out", log=None)
    assert (out / "model.safetensors").is_file()
    assert int(integrate(_velocity, STATE, stop=3).step) == 3
    store = ctx.cache()
    eid = store.put("a", POOLED, {2: STATE}, model_id="m", config_hash=CHASH)
    np.testing.assert_array_equal(np.asarray(store.get(eid).states[2].x), np.asarray(_X))
    ctx.close()
    assert ctx.pipe.latent_shape(1, None, None) == (1, 32, 32, 3)


@pytest.mark.parametrize("row", TABLE, ids=[f"{r.area}:{r.id}" for r in TABLE])
def test_bad_input(row: Bad, ctx, tmp_path):
    ctx.tmp = tmp_path
    failing = row.prepare(ctx)
    target = row.untouched(ctx) if row.untouched is not None else None
    before = _snapshot(target) if target is not None else None
    try:
        with pytest.raises(row.exc, match=row.match):
            failing()
    finally:
        ctx.close()
    if target is not None:
        assert _snapshot(target) == before, f"{row.id} wrote (partial) output under {target}"
