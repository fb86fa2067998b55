"""Flax (nnx) networks: the SD3 / SD3.5 MM-DiT, its configs, loading and rfmpc's format.

Entry point: :func:`load_transformer` (rfmpc-format folder -> jitted callable); diffusers folders
load through :func:`rfmpc.convert.load_transformer`, since the models never import
``weights_conversion`` (nor ``rfmpc.data``).
"""

from rfmpc.models.attention import JointAttention
from rfmpc.models.configs import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM, MMDiTConfig
from rfmpc.models.mmdit import MMDiT
from rfmpc.models.serialization import load_model, save_model
from rfmpc.models.transformer import (
    CPU_AUTOTUNE_CANDIDATES,
    CPU_EIGEN_DOTS,
    CPU_YNN_REDUCTIONS,
    Autotuned,
    Transformer,
    load_transformer,
    save_transformer,
)

__all__ = [
    "CPU_AUTOTUNE_CANDIDATES",
    "CPU_EIGEN_DOTS",
    "CPU_YNN_REDUCTIONS",
    "SD3_MEDIUM",
    "SD35_LARGE",
    "SD35_MEDIUM",
    "Autotuned",
    "JointAttention",
    "MMDiT",
    "MMDiTConfig",
    "Transformer",
    "load_model",
    "load_transformer",
    "save_model",
    "save_transformer",
]
