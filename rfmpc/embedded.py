"""Assemble the embedded default model folder (``rfmpc/assets/embedded``) from a training run.

``python -m rfmpc.embedded --run runs/embedded`` writes ``model_index.json`` and the run's EMA
transformer (rfmpc format). The text encoder is referenced, not copied: the run must have been
trained with the shipped ``rfmpc/assets/text_encoder`` (the default of ``rfmpc.train``), which is
checked against the encoder identity recorded in the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rfmpc.io import atomic_write_bytes
from rfmpc.train import export_transformer

__all__ = ["build_embedded_folder"]

ASSETS = Path(__file__).resolve().parent / "assets"


def build_embedded_folder(
    run_dir: str | Path,
    dest: str | Path = ASSETS / "embedded",
    *,
    text_encoder: str = "../text_encoder",
    shift: float = 1.0,
    guidance: float = 4.0,
    steps: int = 28,
    model_id: str = "rfmpc-embedded-v1",
    use_ema: bool = True,
    extra: dict | None = None,
) -> Path:
    """Write ``dest`` = model_index.json + transformer/ (EMA weights by default).

    ``text_encoder`` is the encoder folder relative to ``dest`` (it must be the encoder the run
    was trained with). The folder is built next to ``dest`` and swapped in at the end.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    export_transformer(run_dir, tmp / "transformer", use_ema=use_ema)
    rec = json.loads((Path(run_dir) / "config.json").read_text())
    index = {
        "_class_name": "RfmpcEmbedded",
        "model_id": model_id,
        "transformer": "transformer",
        "text_encoder": text_encoder,
        "codec": "pixel",
        "shift": shift,
        "default_size": [rec["train"]["resolution"]] * 2,
        "default_steps": steps,
        "default_guidance": guidance,
        "training": {"recipe": rec["train"]},
        **(extra or {}),
    }
    # every file above went through rfmpc.io's atomic writes: the user's normal file mode
    atomic_write_bytes(tmp / "model_index.json", json.dumps(index, indent=2).encode())
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="export a training run as the embedded model")
    p.add_argument("--run", required=True, help="the rfmpc.train output folder")
    p.add_argument("--dest", default=str(ASSETS / "embedded"))
    p.add_argument("--raw", action="store_true", help="export raw weights instead of the EMA")
    args = p.parse_args(argv)
    print(build_embedded_folder(args.run, args.dest, use_ema=not args.raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
