"""The KL autoencoder (diffusers ``AutoencoderKL``) of latent diffusion, in Flax nnx, NHWC.

Encoder: ``conv_in`` -> down blocks (ResNet blocks, stride-2 conv with diffusers' asymmetric
(0, 1, 0, 1) padding) -> mid block (ResNet, single-head self-attention, ResNet) -> GroupNorm,
SiLU, ``conv_out`` to ``2 * latent_channels`` (mean and log-variance). Decoder: the mirror
image with nearest-neighbour x2 upsampling and one more ResNet block per level. All GroupNorms
use eps 1e-6. Module attribute names follow diffusers so that the key map in
``weights_conversion/vae.py`` is a handful of renames.

SD3's VAE has 16 latent channels, no quant convs, ``scaling_factor`` 1.5305 and
``shift_factor`` 0.0609; older SD VAEs (4 channels, quant convs, no shift) are supported too.

References: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (arXiv:2112.10752); Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis" (arXiv:2403.03206), section 5.2.1 (16-channel latents).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

__all__ = [
    "AutoencoderKL",
    "VAEConfig",
    "latents_to_model",
    "model_to_latents",
    "sample_latents",
]

_GN_EPS = 1e-6
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Static configuration of :class:`AutoencoderKL`; defaults are diffusers' defaults.

    Use :meth:`sd3` for Stable Diffusion 3's VAE and :meth:`from_diffusers` for a
    ``config.json``. ``shift_factor`` of ``None`` (older VAEs) means no shift.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    """diffusers' hint that the VAE should run in float32 even in a half-precision pipeline
    (true for SD3's VAE); informational, the dtype is the caller's choice."""

    def __post_init__(self):
        object.__setattr__(
            self, "block_out_channels", tuple(int(c) for c in self.block_out_channels)
        )
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one level")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"VAEConfig.block_out_channels={self.block_out_channels} must all be divisible "
                    f"by norm_num_groups={self.norm_num_groups} (GroupNorm)"
                )
        if self.layers_per_block < 1:
            raise ValueError(
                f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}"
            )
        if self.scaling_factor == 0:
            raise ValueError("VAEConfig.scaling_factor must be non-zero")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each axis: ``2 ** (levels - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd3(cls) -> VAEConfig:
        """Stable Diffusion 3 / 3.5's VAE."""
        return cls(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Build from a diffusers ``AutoencoderKL`` ``config.json`` dict (absent keys take
        diffusers' defaults); raise ``ValueError`` on features this port does not implement."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict from config.json, got {type(config).__name__}")
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"config is for {name!r}, expected 'AutoencoderKL'")
        act = config.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"act_fn={act!r} is not supported (only 'silu')")
        n = len(config.get("block_out_channels", cls.block_out_channels))
        down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",) * n))
        up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",) * n))
        if down != ("DownEncoderBlock2D",) * n or up != ("UpDecoderBlock2D",) * n:
            raise ValueError(
                f"only DownEncoderBlock2D / UpDecoderBlock2D blocks, one per level, are supported; "
                f"got down_block_types={down}, up_block_types={up}"
            )
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(
                    f"{key} is set: per-channel latent statistics are not supported (SD3's VAE "
                    "uses scaling_factor and shift_factor only)"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


def latents_to_model(z: Float[Array, "b h w c"], cfg: VAEConfig) -> Float[Array, "b h w c"]:
    """VAE latents -> the diffusion model's latent space: ``(z - shift) * scale``."""
    shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
    return (z - shift) * cfg.scaling_factor


def model_to_latents(x: Float[Array, "b h w c"], cfg: VAEConfig) -> Float[Array, "b h w c"]:
    """Inverse of :func:`latents_to_model`: ``x / scale + shift``, ready for ``decode``."""
    shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
    return x / cfg.scaling_factor + shift


def sample_latents(
    key: jax.Array, mean: Float[Array, "b h w c"], logvar: Float[Array, "b h w c"]
) -> Float[Array, "b h w c"]:
    """Draw ``mean + exp(logvar / 2) * eps`` from the encoder's diagonal Gaussian."""
    eps = jax.random.normal(key, mean.shape, dtype=mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def _group_norm(ch, cfg, dtype, param_dtype, rngs):
    return nnx.GroupNorm(
        ch,
        num_groups=cfg.norm_num_groups,
        epsilon=_GN_EPS,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _conv(cin, cout, k, dtype, param_dtype, rngs, *, stride=1, padding=None):
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv3x3 twice plus a (1x1-conv when widths differ) skip connection."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        self.norm1 = _group_norm(cin, cfg, dtype, param_dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, dtype, param_dtype, rngs)
        self.norm2 = _group_norm(cout, cfg, dtype, param_dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, dtype, param_dtype, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, dtype, param_dtype, rngs) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over all H*W positions, with a residual connection."""

    def __init__(self, ch: int, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        self.group_norm = _group_norm(ch, cfg, dtype, param_dtype, rngs)

        def lin():
            return nnx.Linear(ch, ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.to_q, self.to_k, self.to_v, self.to_out = lin(), lin(), lin(), lin()

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = (f(t)[:, :, None, :] for f in (self.to_q, self.to_k, self.to_v))
        # (b, h*w, 1 head, c); float32 logits; cuDNN flash attention on GPU when available
        out = jax.nn.dot_product_attention(q, k, v)[:, :, 0, :]
        return x + self.to_out(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """ResNet -> (attention) -> ResNet at the lowest resolution."""

    def __init__(self, ch: int, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, cfg, **kw) for _ in range(2)])
        self.attention = (
            SpatialSelfAttention(ch, cfg, **kw) if cfg.mid_block_add_attention else None
        )

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """``n`` ResNet blocks then, except at the last level, a stride-2 3x3 conv."""

    def __init__(self, cin, cout, n, add_downsample, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, cfg, **kw) for i in range(n)]
        )
        # diffusers pads (0, 1, 0, 1) (right and bottom only) and then convolves with no padding.
        self.downsampler = (
            _conv(cout, cout, 3, dtype, param_dtype, rngs, stride=2, padding="VALID")
            if add_downsample
            else None
        )

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.downsampler is not None:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = self.downsampler(x)
        return x


class UpBlock(nnx.Module):
    """``n`` ResNet blocks then, except at the last level, nearest x2 upsampling and a 3x3 conv."""

    def __init__(self, cin, cout, n, add_upsample, cfg, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if i == 0 else cout, cout, cfg, **kw) for i in range(n)]
        )
        self.upsampler = _conv(cout, cout, 3, dtype, param_dtype, rngs) if add_upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        if self.upsampler is not None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = self.upsampler(x)
        return x


class Encoder(nnx.Module):
    """Images (b, H, W, in_channels) -> moments (b, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        boc = cfg.block_out_channels
        self.conv_in = _conv(cfg.in_channels, boc[0], 3, **kw)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, i < len(boc) - 1, cfg, **kw
                )
                for i in range(len(boc))
            ]
        )
        self.mid_block = MidBlock(boc[-1], cfg, **kw)
        self.conv_norm_out = _group_norm(boc[-1], cfg, dtype, param_dtype, rngs)
        self.conv_out = _conv(boc[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (b, h, w, latent_channels) -> images (b, h*f, w*f, out_channels)."""

    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = tuple(reversed(cfg.block_out_channels))
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], cfg, **kw)
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    cfg.layers_per_block + 1,
                    i < len(rev) - 1,
                    cfg,
                    **kw,
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = _group_norm(rev[-1], cfg, dtype, param_dtype, rngs)
        self.conv_out = _conv(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` (encoder + decoder + optional 1x1 quant convs), NHWC.

    ``encode`` maps images in [-1, 1] to the posterior's ``(mean, logvar)`` (log-variance
    clamped to [-30, 20] as diffusers does); ``decode`` maps *VAE* latents (not the diffusion
    model's scaled latents: see :func:`model_to_latents`) back to images, nominally in [-1, 1]
    and not clipped.
    """

    def __init__(
        self,
        config: VAEConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not isinstance(config, VAEConfig):
            raise TypeError(
                f"config must be a VAEConfig (use VAEConfig.from_diffusers), got {type(config)}"
            )
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        lc = config.latent_channels
        self.quant_conv = _conv(2 * lc, 2 * lc, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lc, lc, 1, **kw) if config.use_post_quant_conv else None

    def encode(
        self, images: Float[Array, "b H W c_in"]
    ) -> tuple[Float[Array, "b h w c"], Float[Array, "b h w c"]]:
        """Images in [-1, 1], NHWC -> ``(mean, logvar)`` of the latent posterior."""
        cfg = self.config
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"images must be NHWC with {cfg.in_channels} channels, got shape {images.shape}; "
                "transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
            )
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX)

    def decode(self, latents: Float[Array, "b h w c"]) -> Float[Array, "b H W c_out"]:
        """VAE latents, NHWC -> images (nominally in [-1, 1], unclipped), NHWC."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(
                f"latents must be NHWC with {cfg.latent_channels} channels, got shape "
                f"{latents.shape}; transpose NCHW arrays with z.transpose(0, 2, 3, 1)"
            )
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
