"""``rfmpc convert``: a diffusers SD3 folder -> the same layout with every model in rfmpc's format.

rfmpc's format (``config.json`` + ``model.safetensors`` of nnx variables already in rfmpc layout,
see :mod:`rfmpc.models.serialization`) loads with a plain strict copy: no key mapping and no
transposes, so loading a converted folder is faster than converting on every start. Tokenizers,
the scheduler config and ``model_index.json`` are copied; the converted ``model_index.json`` gains
``"_rfmpc_converted": true``. :func:`load_component` reads either format.

The output is written to a temporary sibling folder and renamed into place at the end, so an
interrupted conversion never leaves a half-converted folder under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax.numpy as jnp

from rfmpc.io import atomic_write_bytes

__all__ = ["ConversionError", "convert_folder", "load_component", "load_transformer"]

_COMPONENT_KINDS = {
    "transformer": "mmdit",
    "vae": "vae",
    "text_encoder": "clip",
    "text_encoder_2": "clip",
    "text_encoder_3": "t5",
}
_COPY = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


class ConversionError(ValueError):
    """The source folder is not a (complete) diffusers SD3 folder."""


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConversionError(f"{path} is missing: {folder} is not a model folder") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from e


def _load_diffusers(folder: Path, kind: str, dtype):
    if kind == "mmdit":
        return load_transformer(folder, dtype=dtype)
    if kind == "vae":
        from weights_conversion.vae import load_vae

        return load_vae(folder, dtype)
    if kind == "clip":
        from weights_conversion.clip import load_clip_text

        return load_clip_text(folder, dtype)
    if kind == "t5":
        from weights_conversion.t5 import load_t5_encoder

        return load_t5_encoder(folder, dtype)
    raise ValueError(f"unknown component kind {kind!r}")


def _builder(kind: str, dtype):
    # built under nnx.eval_shape by load_model: a constant-key Rngs stand-in keeps that fast
    from weights_conversion.torch_layout import _ConstantRngs as Rngs

    if kind == "vae":
        from rfmpc.models.vae import AutoencoderKL, VAEConfig

        return lambda c: AutoencoderKL(
            VAEConfig.from_diffusers(c), dtype=dtype, param_dtype=dtype, rngs=Rngs()
        )
    if kind == "clip":
        from rfmpc.models.clip import CLIPTextConfig, CLIPTextModelWithProjection

        return lambda c: CLIPTextModelWithProjection(
            CLIPTextConfig.from_hf(c), dtype=dtype, param_dtype=dtype, rngs=Rngs()
        )
    if kind == "t5":
        from rfmpc.models.t5 import T5Config, T5EncoderModel

        return lambda c: T5EncoderModel(
            T5Config.from_hf(c), dtype=dtype, param_dtype=dtype, rngs=Rngs()
        )
    raise ValueError(f"unknown component kind {kind!r}")


def load_transformer(folder: str | os.PathLike, dtype=jnp.float32, *, attention: str = "auto"):
    """Load an SD3/SD3.5 MM-DiT from a diffusers or rfmpc folder as a jitted callable.

    Args:
        folder: diffusers transformer folder (``config.json`` +
            ``diffusion_pytorch_model.safetensors`` or a sharded ``.safetensors.index.json``),
            a whole diffusers pipeline folder (its ``transformer/`` subfolder is used), or an
            rfmpc-format folder (:func:`rfmpc.models.save_transformer` / ``rfmpc convert``).
        dtype: parameter and compute dtype (``jnp.float32`` or ``jnp.bfloat16``; LayerNorms,
            softmax, residual streams and adaLN modulation stay float32 either way).
        attention: ``"auto"`` (cuDNN flash attention for half precision on GPU, else XLA),
            ``"xla"`` or ``"cudnn"``.

    Returns a :class:`rfmpc.models.Transformer`; a diffusers folder is built abstractly
    (``nnx.eval_shape``) and converted strictly by ``weights_conversion.mmdit``. Raises
    :class:`~rfmpc.weights_io.WeightLoadError` on any missing, extra or mis-shaped key, and
    ``ValueError`` on an unsupported config or dtype.
    """
    from rfmpc.models.serialization import is_rfmpc_folder
    from rfmpc.models.transformer import Transformer, check_dtype, resolve_folder
    from rfmpc.models.transformer import load_transformer as load_rfmpc_transformer

    dtype = check_dtype(dtype)
    folder = resolve_folder(Path(folder))
    if is_rfmpc_folder(folder):
        return load_rfmpc_transformer(folder, dtype, attention=attention)
    from weights_conversion.mmdit import load_diffusers_mmdit

    module, _ = load_diffusers_mmdit(folder, dtype=dtype, param_dtype=dtype, attention=attention)
    return Transformer.from_module(module)


def load_component(folder: str | os.PathLike, kind: str, dtype=jnp.float32):
    """Load one component (``mmdit``, ``vae``, ``clip``, ``t5``) from a diffusers/transformers
    folder or an rfmpc-format folder written by :func:`convert_folder`."""
    from rfmpc.models.serialization import is_rfmpc_folder, load_model

    folder = Path(folder)
    if not is_rfmpc_folder(folder):
        return _load_diffusers(folder, kind, dtype)
    if kind == "mmdit":
        return load_transformer(folder, dtype=dtype)
    module, _ = load_model(folder, _builder(kind, dtype), kind=kind, dtype=dtype)
    return module


def _save(module, folder: Path, kind: str, source_config: dict) -> None:
    from rfmpc.models.serialization import save_model
    from rfmpc.models.transformer import save_transformer

    if kind == "mmdit":
        save_transformer(module, folder)
    else:
        save_model(module, folder, source_config, kind=kind)


def convert_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype=jnp.float32,
    overwrite: bool = False,
    log=print,
) -> Path:
    """Convert a diffusers SD3 pipeline folder (or a single transformer folder) to rfmpc format.

    Args:
        src: the diffusers folder (``model_index.json`` + components, or one transformer).
        dst: the output folder (must not exist unless ``overwrite``).
        dtype: parameter dtype to store (float32, bfloat16 or float16).
        overwrite: replace ``dst`` if it exists.
        log: progress messages (``None`` to silence).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass --overwrite to replace it")
    if dst.resolve() == src.resolve():
        raise ConversionError("the output folder must differ from the source folder")
    if src.resolve() in dst.resolve().parents:
        raise ConversionError(
            f"the output folder {dst} is inside the source folder {src}; pick a folder outside it"
        )
    say = log or (lambda *_: None)
    tmp = dst.with_name(dst.name + ".converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        index_path = src / "model_index.json"
        if not index_path.is_file():  # a single transformer folder
            cfg = _read_config(src)
            say(f"converting transformer {src}")
            _save(_load_diffusers(src, "mmdit", dtype), tmp, "mmdit", cfg)
        else:
            try:
                index = json.loads(index_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(
                    f"{index_path} is not valid JSON ({e}); restore it from the original "
                    "download (diffusers' save_pretrained writes it)"
                ) from e
            if index.get("_class_name") != "StableDiffusion3Pipeline":
                raise ConversionError(
                    f"{index_path} describes {index.get('_class_name')!r}; only "
                    "StableDiffusion3Pipeline folders are supported"
                )
            for name, kind in _COMPONENT_KINDS.items():
                entry = index.get(name)
                if not (isinstance(entry, list) and entry[0] is not None):
                    if name == "text_encoder_3":
                        continue  # SD3 may ship without T5
                    raise ConversionError(f"{index_path}: component {name!r} is missing")
                if not (src / name).is_dir():
                    raise ConversionError(
                        f"{src}: subfolder {name!r} listed in model_index.json does not exist"
                    )
                say(f"converting {name} ({kind})")
                _save(
                    _load_diffusers(src / name, kind, dtype),
                    tmp / name,
                    kind,
                    _read_config(src / name),
                )
            for name in _COPY:
                if (src / name).is_dir():
                    shutil.copytree(src / name, tmp / name)
            index["_rfmpc_converted"] = True
            atomic_write_bytes(tmp / "model_index.json", json.dumps(index, indent=2).encode())
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {dst}")
    return dst
