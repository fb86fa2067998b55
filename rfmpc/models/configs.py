"""Configurations of the SD3 MM-DiT transformer, mirroring diffusers' ``SD3Transformer2DModel``.

:class:`MMDiTConfig` has exactly the fields of diffusers' config (same names, same defaults), so a
diffusers ``config.json`` round-trips through :meth:`MMDiTConfig.from_diffusers` /
:meth:`MMDiTConfig.to_diffusers`. The presets are the released Stable Diffusion 3 / 3.5
transformers (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", arXiv:2403.03206).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["QK_NORMS", "SD3_MEDIUM", "SD35_LARGE", "SD35_MEDIUM", "MMDiTConfig"]

#: QK-norm variants diffusers' SD3 joint attention accepts (``None`` means no QK-norm).
QK_NORMS = (None, "rms_norm", "layer_norm", "fp32_layer_norm")

#: Width of the sinusoidal timestep features (diffusers' ``Timesteps(num_channels=256)``).
TIMESTEP_CHANNELS = 256

_CLASS_NAME = "SD3Transformer2DModel"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MMDiTConfig.{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Hyper-parameters of an SD3 MM-DiT (field names and defaults as in diffusers).

    Attributes:
        sample_size: latent height/width the model was trained at; it sets the base size of the
            sinusoidal position table (``base_size = sample_size // patch_size``).
        patch_size: side of the square patches (tokens) the latent is cut into.
        in_channels: latent channels of the input.
        num_layers: number of joint transformer blocks; the last one is "context pre-only"
            (it updates only the image stream).
        attention_head_dim: channels per attention head.
        num_attention_heads: heads per attention; the model width is heads x head_dim.
        joint_attention_dim: width of the text encoder hidden states (T5/CLIP: 4096).
        caption_projection_dim: width the text tokens are projected to; must equal the model width.
        pooled_projection_dim: width of the pooled text embedding (CLIP-L + CLIP-G: 2048).
        out_channels: latent channels of the output (``None``: same as ``in_channels``).
        pos_embed_max_size: side of the sinusoidal position table whose centre is cropped for a
            given latent size; ``None`` recomputes the table for each size instead.
        dual_attention_layers: indices of blocks with a second self-attention on the image
            stream (SD3.5's MMDiT-X).
        qk_norm: normalisation of queries and keys per head (``None`` or ``"rms_norm"`` in the
            released models; ``"layer_norm"`` and ``"fp32_layer_norm"`` are accepted too).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        for name in (
            "sample_size",
            "patch_size",
            "in_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
            "caption_projection_dim",
            "pooled_projection_dim",
        ):
            _positive_int(name, getattr(self, name))
        if self.out_channels is not None:
            _positive_int("out_channels", self.out_channels)
        if self.pos_embed_max_size is not None:
            _positive_int("pos_embed_max_size", self.pos_embed_max_size)
        try:
            layers = tuple(self.dual_attention_layers)
        except TypeError as e:
            raise TypeError(
                "MMDiTConfig.dual_attention_layers must be a sequence of block indices, got "
                f"{self.dual_attention_layers!r}"
            ) from e
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"MMDiTConfig.dual_attention_layers must hold ints, got {layers!r}")
        # diffusers silently ignores indices outside [0, num_layers); we keep the tuple as given
        # so that to_diffusers() round-trips, and only use the ones that exist.
        object.__setattr__(self, "dual_attention_layers", layers)
        if self.qk_norm not in QK_NORMS:
            raise ValueError(
                f"MMDiTConfig.qk_norm={self.qk_norm!r} is not supported by SD3's joint attention; "
                f"use one of {QK_NORMS}"
            )
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"MMDiTConfig.caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim}): the text stream "
                "shares the blocks' width (diffusers fails at run time otherwise)"
            )
        if self.inner_dim % 4:
            raise ValueError(
                f"the model width num_attention_heads * attention_head_dim = {self.inner_dim} "
                "must be divisible by 4 for the 2-D sinusoidal position embedding"
            )

    @property
    def inner_dim(self) -> int:
        """Model width: ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        """Output channels (``out_channels``, or ``in_channels`` when that is ``None``)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    def is_dual(self, layer: int) -> bool:
        """Whether block ``layer`` has the second (image-only) self-attention of SD3.5."""
        return layer in self.dual_attention_layers

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> MMDiTConfig:
        """Build from a diffusers ``config.json`` dict of ``SD3Transformer2DModel``.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ``_name_or_path``) are
        metadata and ignored; any other unknown key, a ``_class_name`` other than
        ``SD3Transformer2DModel`` or an unsupported value raises ``ValueError``.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (a parsed config.json), got {type(config)}")
        cls_name = config.get("_class_name", _CLASS_NAME)
        if cls_name != _CLASS_NAME:
            raise ValueError(
                f"config is for {cls_name!r}, not {_CLASS_NAME!r}: pass the transformer's "
                "config.json (the 'transformer' subfolder of a pipeline)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(
                f"unsupported SD3 transformer config key(s) {unknown}; rfmpc supports "
                f"{sorted(names)}"
            )
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("dual_attention_layers") is None:
            kwargs.pop("dual_attention_layers", None)
        return cls(**kwargs)

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` dict (JSON-ready: tuples become lists)."""
        d: dict[str, Any] = {"_class_name": _CLASS_NAME}
        d.update(dataclasses.asdict(self))
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


#: Stable Diffusion 3 medium (2B): 24 blocks of width 1536, no QK-norm, 192x192 position table.
SD3_MEDIUM = MMDiTConfig(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)

#: Stable Diffusion 3.5 medium (2.5B, MMDiT-X): dual attention in blocks 0-12, RMS QK-norm,
#: 384x384 position table.
SD35_MEDIUM = dataclasses.replace(
    SD3_MEDIUM,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)

#: Stable Diffusion 3.5 large (8B): 38 blocks of width 2432 (38 heads x 64), RMS QK-norm.
SD35_LARGE = dataclasses.replace(
    SD3_MEDIUM,
    num_layers=38,
    num_attention_heads=38,
    caption_projection_dim=2432,
    qk_norm="rms_norm",
)
