"""Tiny random diffusers ``SD3Transformer2DModel`` fixtures for the MM-DiT parity tests.

diffusers zero-initialises the adaLN modulation and several output layers; zeros would hide
mapping bugs (a swapped chunk order multiplies zeros), so :func:`randomize_` redraws every
parameter with non-trivial values. Everything is seeded (``torch.Generator``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file

#: Tiny shared base config: width 16 = 2 heads x 8, 3 blocks (the last one context-pre-only).
BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=16,
    pooled_projection_dim=20,
    out_channels=4,
    pos_embed_max_size=12,
    dual_attention_layers=(),
    qk_norm=None,
)

#: Variants mirroring the released models' structure at toy size, plus corner cases.
#: Each entry: (diffusers config overrides, latent (height, width)).
VARIANTS = {
    # SD3-medium: no QK-norm, position table 3x the base grid (192 vs 128/2).
    "sd3-medium-like": (dict(), (8, 12)),
    # SD3.5-medium: dual attention in the first blocks, RMS QK-norm, table 6x the base (384).
    "sd35-medium-like": (
        dict(dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=24),
        (8, 12),
    ),
    # SD3.5-large: RMS QK-norm, odd head count (38 in the real model); odd 5x3 token grid.
    "sd35-large-like": (
        dict(num_attention_heads=3, caption_projection_dim=24, qk_norm="rms_norm"),
        (10, 6),
    ),
    # Patch size 4, non-square, different in/out channels, head dim 16, two blocks,
    # parameter-free float32 LayerNorm QK-norm.
    "patch4-outch-fp32ln": (
        dict(
            patch_size=4,
            sample_size=16,
            num_layers=2,
            attention_head_dim=16,
            caption_projection_dim=32,
            out_channels=6,
            pos_embed_max_size=8,
            qk_norm="fp32_layer_norm",
        ),
        (16, 8),
    ),
    # No max size: the table is recomputed per latent size; dual attention on the last block.
    "no-pos-max-dual-last": (
        dict(pos_embed_max_size=None, dual_attention_layers=(2,), qk_norm="layer_norm"),
        (8, 12),
    ),
}


def config(name: str) -> dict:
    overrides, _ = VARIANTS[name]
    return {**BASE, **overrides}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm gains ~
    N(1, 0.2^2). Buffers (the sincos position table) are left as diffusers built them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def make_model(cfg: dict, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return randomize_(SD3Transformer2DModel(**cfg), seed).eval()


def save(model: SD3Transformer2DModel, folder: Path) -> Path:
    """``save_pretrained``: ``config.json`` + one fp32 ``diffusion_pytorch_model.safetensors``."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def save_cast(model: SD3Transformer2DModel, folder: Path, dtype: torch.dtype) -> Path:
    """Save a copy of ``model`` with every tensor (buffers included) cast to ``dtype``."""
    copy = SD3Transformer2DModel.from_config(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(dtype).save_pretrained(folder, safe_serialization=True)
    return folder


def save_sharded(model: SD3Transformer2DModel, folder: Path, n_shards: int = 3) -> Path:
    """Write ``n_shards`` safetensors shards and the diffusers ``.index.json`` by hand."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(model.config)))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map, total = {}, 0
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n_shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def inputs(cfg: dict, hw: tuple[int, int], *, batch: int = 2, tokens: int = 7, seed: int = 0):
    """Random NHWC latent, text states and pooled text (numpy float32)."""
    rng = np.random.default_rng(seed)
    h, w = hw
    return dict(
        hidden_states=rng.standard_normal((batch, h, w, cfg["in_channels"]), np.float32),
        encoder_hidden_states=rng.standard_normal(
            (batch, tokens, cfg["joint_attention_dim"]), np.float32
        ),
        pooled_projections=rng.standard_normal((batch, cfg["pooled_projection_dim"]), np.float32),
    )


def reference(model: SD3Transformer2DModel, inp: dict, timestep) -> np.ndarray:
    """diffusers' forward (NCHW inside) on NHWC numpy inputs; returns NHWC numpy."""
    x = torch.from_numpy(inp["hidden_states"]).permute(0, 3, 1, 2)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        out = model(
            hidden_states=x.to(dtype),
            encoder_hidden_states=torch.from_numpy(inp["encoder_hidden_states"]).to(dtype),
            pooled_projections=torch.from_numpy(inp["pooled_projections"]).to(dtype),
            timestep=torch.as_tensor(np.asarray(timestep, np.float32)),
        ).sample
    return out.float().permute(0, 2, 3, 1).numpy()
