"""Assemble the embedded default model folder (``rfmpc/assets/embedded``) from a training run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rfmpc.io import atomic_write_bytes
from rfmpc.train import export_transformer

__all__ = ["build_embedded_folder"]


def build_embedded_folder(
    run_dir: str | Path,
    text_encoder_dir: str | Path,
    dest: str | Path,
    *,
    shift: float = 1.0,
    guidance: float = 4.0,
    steps: int = 28,
    model_id: str = "rfmpc-embedded-v1",
    extra: dict | None = None,
    use_ema: bool = True,
) -> Path:
    """Write ``dest`` = model_index.json + transformer/ (EMA weights) + text_encoder/.

    The text encoder the run was trained with is copied next to the transformer, so the pair
    that ships is exactly the pair that was trained together.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    export_transformer(run_dir, tmp / "transformer", use_ema=use_ema)
    shutil.copytree(text_encoder_dir, tmp / "text_encoder")
    index = {
        "_class_name": "RfmpcEmbedded",
        "model_id": model_id,
        "transformer": "transformer",
        "text_encoder": "text_encoder",
        "codec": "pixel",
        "shift": shift,
        "default_size": [32, 32],
        "default_steps": steps,
        "default_guidance": guidance,
        **(extra or {}),
    }
    atomic_write_bytes(tmp / "model_index.json", json.dumps(index, indent=2).encode())
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest
