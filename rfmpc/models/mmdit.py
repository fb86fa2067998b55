"""The Stable Diffusion 3 / 3.5 MM-DiT in Flax nnx, NHWC in and out.

A port of diffusers' ``SD3Transformer2DModel`` (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", arXiv:2403.03206), including SD3.5's MMDiT-X
blocks with a second image-only self-attention and QK-norm. Pieces, in order of use:

1. :class:`PatchEmbed`: ``p x p`` patches -> tokens, plus the centre crop of a fixed 2-D sincos
   position table (Vaswani et al. 2017; ViT/MAE-style 2-D variant).
2. :class:`TimestepTextEmbed`: sinusoidal features of ``timestep = sigma * 1000`` through an MLP,
   plus an MLP of the pooled text embedding: the conditioning vector ``temb``.
3. ``context_embedder``: a linear map of the text-encoder states to the model width.
4. :class:`JointTransformerBlock` x ``num_layers``: adaLN-Zero (Peebles & Xie 2023, DiT,
   arXiv:2212.09748) modulated joint attention and GELU-tanh MLPs, separate weights per stream.
5. ``norm_out`` (adaLN, ``(scale, shift)`` order) and ``proj_out``, then un-patchify.

Numerics: matmuls run in ``dtype`` (e.g. bfloat16) with parameters in ``param_dtype``; the
residual streams, every LayerNorm, the softmax, the timestep/text embedding and the adaLN
modulation run in float32 whatever ``dtype`` is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from rfmpc.models.attention import JointAttention, layer_norm
from rfmpc.models.configs import TIMESTEP_CHANNELS, MMDiTConfig

__all__ = [
    "Buffer",
    "FeedForward",
    "JointTransformerBlock",
    "MMDiT",
    "PatchEmbed",
    "TimestepTextEmbed",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]

#: eps of every LayerNorm in the MM-DiT (diffusers: ``nn.LayerNorm(..., eps=1e-6)``).
NORM_EPS = 1e-6


class Buffer(nnx.Variable):
    """Non-trainable state that checkpoints carry (the position table): loaded and saved with
    the parameters, but not an ``nnx.Param``, so optimisers and ``nnx.grad`` leave it alone."""


# ----------------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------------


def timestep_embedding(
    timesteps: Float[Array, " b"], dim: int = TIMESTEP_CHANNELS, max_period: float = 10000.0
) -> Float[Array, "b dim"]:
    """Sinusoidal timestep features ``[cos(t w_k), sin(t w_k)]``, ``w_k = max_period^(-k/half)``.

    Matches diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)`` (DDPM, Ho et al. 2020; Transformer, Vaswani et al. 2017); float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, pos, xp):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    if xp is jnp:
        omega = jnp.asarray(omega, jnp.float32)
    out = pos.reshape(-1)[:, None] * omega[None, :]
    return xp.concatenate([xp.sin(out), xp.cos(out)], axis=1)


def sincos_pos_embed_2d(
    embed_dim: int, grid_h: int, grid_w: int, base_size: float, *, xp=np
) -> Float[Array | np.ndarray, "grid_h grid_w embed_dim"]:
    """The 2-D sinusoidal position table of diffusers' ``get_2d_sincos_pos_embed``.

    Row ``i`` sits at height ``i * base_size / grid_h`` and column ``j`` at width
    ``j * base_size / grid_w``; the first half of the channels encodes the column (width)
    coordinate and the second half the row, each as ``[sin, cos]`` of geometric frequencies.
    With ``xp=np`` (default) it is computed in float64 like diffusers and returned as float32;
    with ``xp=jnp`` in float32, traceable (used to initialise the table without host work).
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    ftype = np.float32
    pos_h = np.arange(grid_h, dtype=ftype) / ftype(grid_h / base_size)
    pos_w = np.arange(grid_w, dtype=ftype) / ftype(grid_w / base_size)
    if xp is jnp:
        pos_h, pos_w = jnp.asarray(pos_h), jnp.asarray(pos_w)
    else:
        pos_h, pos_w = pos_h.astype(np.float64), pos_w.astype(np.float64)
    cols = xp.broadcast_to(pos_w[None, :], (grid_h, grid_w))
    rows = xp.broadcast_to(pos_h[:, None], (grid_h, grid_w))
    half = embed_dim // 2
    emb = xp.concatenate([_sincos_1d(half, cols, xp), _sincos_1d(half, rows, xp)], axis=1)
    return emb.reshape(grid_h, grid_w, embed_dim).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


def _linear(din, dout, *, dtype, param_dtype, rngs, kernel_init=None, zero=False):
    init = nnx.initializers.zeros_init() if zero else kernel_init
    init = init or nnx.initializers.xavier_uniform()
    return nnx.Linear(
        din,
        dout,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=init,
        bias_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )


class _KeyStream:
    """Stand-in for ``nnx.Rngs`` inside :class:`MMDiT`'s constructor: ``params()`` folds a
    Python counter into one key drawn from the caller's ``Rngs``.

    Why: each ``nnx.Rngs.params()`` call updates an ``RngCount`` variable, and under tracing
    (``nnx.eval_shape`` when loading, ``nnx.jit`` init) flax 0.12 then reads ``.sharding`` of a
    tracer, which makes JAX walk the whole jaxpr: quadratic, ~20 s for SD3.5-large's ~700
    layers. Drawing keys from a plain counter keeps abstract construction linear (~1 s).
    """

    def __init__(self, key: Array):
        self._key = key
        self._count = 0

    def params(self) -> Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count)


def _initial_table(d: int, m: int, base: float, dtype) -> Array:
    """The ``(m, m, d)`` position table: exact (float64 on the host, as diffusers) when built
    eagerly; symbolic float32 under tracing (``nnx.eval_shape`` / ``nnx.jit``), which costs no
    host memory for the large SD3.5 tables."""
    if isinstance(jnp.zeros((), jnp.float32), jax.core.Tracer):
        return sincos_pos_embed_2d(d, m, m, base, xp=jnp).astype(dtype)
    return jnp.asarray(sincos_pos_embed_2d(d, m, m, base).astype(jnp.dtype(dtype)))


def _modulate(x, shift, scale):
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``(b, d)`` shift and scale."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class PatchEmbed(nnx.Module):
    """``p x p`` patches of an NHWC latent -> tokens, plus the (cropped) sincos positions.

    The projection is diffusers' stride-``p`` ``Conv2d`` (kernel stored HWIO), computed as a
    patchify + matmul. With ``pos_embed_max_size = m`` the model holds an ``(m, m, d)`` table (a
    :class:`Buffer`, loaded from checkpoints) and adds its centre ``(h, w)`` crop; with ``None``
    the table is recomputed for each latent size.
    """

    def __init__(self, config: MMDiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs | _KeyStream):
        p, c, d = config.patch_size, config.in_channels, config.inner_dim
        self.patch_size = p
        self.max_size = config.pos_embed_max_size
        self.base_size = config.sample_size // p
        self.dtype = dtype
        self.proj = nnx.Conv(
            c,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )
        if self.max_size is not None:
            # Positions are i * base / m: diffusers builds the m x m table with base_size
            # sample_size // patch_size (the crop then keeps the trained spacing).
            self.pos_embed = Buffer(_initial_table(d, self.max_size, self.base_size, param_dtype))
        else:
            self.pos_embed = nnx.data(None)

    def positions(self, h: int, w: int) -> Float[Array, "h w d"]:
        """Position embeddings of an ``h x w`` token grid (float32)."""
        if self.pos_embed is None:
            d = self.proj.out_features
            return jnp.asarray(sincos_pos_embed_2d(d, h, w, self.base_size))
        m = self.max_size
        if h > m or w > m:
            raise ValueError(
                f"latent of {h}x{w} patches exceeds pos_embed_max_size={m}: pass a latent of at "
                f"most {m * self.patch_size}x{m * self.patch_size}"
            )
        top, left = (m - h) // 2, (m - w) // 2
        return self.pos_embed[...][top : top + h, left : left + w].astype(jnp.float32)

    def __call__(self, x: Float[Array, "b H W c"]) -> Float[Array, "b n d"]:
        b, hh, ww, c = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        patches = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, h * w, p * p * c).astype(self.dtype)
        kernel = self.proj.kernel[...].astype(self.dtype).reshape(p * p * c, -1)
        tokens = jnp.einsum("bnk,kd->bnd", patches, kernel, preferred_element_type=jnp.float32)
        tokens = tokens + self.proj.bias[...].astype(jnp.float32)[None, None, :]
        pos = self.positions(h, w).reshape(1, h * w, -1)
        return tokens + pos


class _MLP(nnx.Module):
    """``linear_2(silu(linear_1(x)))`` in float32 (diffusers' ``TimestepEmbedding`` and
    ``PixArtAlphaTextProjection(act_fn="silu")``)."""

    def __init__(self, din, dout, *, param_dtype, rngs):
        init = nnx.initializers.normal(0.02)
        kw = dict(dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs, kernel_init=init)
        self.linear_1 = _linear(din, dout, **kw)
        self.linear_2 = _linear(dout, dout, **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x.astype(jnp.float32))))


class TimestepTextEmbed(nnx.Module):
    """``temb = MLP(sincos(timestep)) + MLP(pooled_text)``.

    diffusers' ``CombinedTimestepTextProjEmbeddings``, computed in float32.
    """

    def __init__(self, dim: int, pooled_dim: int, *, param_dtype, rngs: nnx.Rngs | _KeyStream):
        self.timestep_embedder = _MLP(TIMESTEP_CHANNELS, dim, param_dtype=param_dtype, rngs=rngs)
        self.text_embedder = _MLP(pooled_dim, dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, timestep: Float[Array, " b"], pooled: Float[Array, "b p"]
    ) -> Float[Array, "b d"]:
        return self.timestep_embedder(timestep_embedding(timestep)) + self.text_embedder(pooled)


class AdaLNModulation(nnx.Module):
    """``chunks(linear(silu(temb)), k)`` in float32: the adaLN shift/scale/gate vectors.

    Zero-initialised (adaLN-Zero, DiT) so that a freshly built model starts as the identity
    on each residual stream.
    """

    def __init__(self, dim: int, chunks: int, *, param_dtype, rngs: nnx.Rngs | _KeyStream):
        self.chunks = chunks
        self.linear = _linear(
            dim, chunks * dim, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs, zero=True
        )

    def __call__(self, temb: Float[Array, "b d"]) -> list[Float[Array, "b d"]]:
        return jnp.split(self.linear(jax.nn.silu(temb.astype(jnp.float32))), self.chunks, axis=-1)


class FeedForward(nnx.Module):
    """``fc2(gelu_tanh(fc1(x)))`` with a 4x hidden width (diffusers' ``FeedForward``
    with ``activation_fn="gelu-approximate"``)."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs | _KeyStream, mult: int = 4):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = _linear(dim, mult * dim, **kw)
        self.fc2 = _linear(mult * dim, dim, **kw)

    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class JointTransformerBlock(nnx.Module):
    """One MM-DiT block (diffusers' ``JointTransformerBlock``).

    Image stream: adaLN-Zero (6 chunks ``shift, scale, gate`` for attention then MLP; with
    ``dual=True`` SD3.5's ``SD35AdaLayerNormZeroX``, 9 chunks, whose last three modulate a
    second, image-only self-attention ``attn2`` applied after the joint one). Text stream:
    adaLN-Zero as well, except with ``context_pre_only=True`` (the last block) where it gets a
    plain adaLN (2 chunks, ``scale, shift``), joins the attention as keys/values and queries
    but is not updated or returned.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        context_pre_only: bool,
        qk_norm: str | None,
        dual: bool,
        dtype,
        param_dtype,
        attention: str = "auto",
        rngs: nnx.Rngs | _KeyStream,
    ):
        self.context_pre_only = context_pre_only
        self.dual = dual
        self.dtype = dtype
        mod = dict(param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = AdaLNModulation(dim, 9 if dual else 6, **mod)
        self.norm1_context = AdaLNModulation(dim, 2 if context_pre_only else 6, **mod)
        akw = dict(qk_norm=qk_norm, implementation=attention, **kw)
        self.attn = JointAttention(
            dim, num_heads, head_dim, with_context=True, context_pre_only=context_pre_only, **akw
        )
        self.attn2 = nnx.data(
            JointAttention(dim, num_heads, head_dim, with_context=False, **akw) if dual else None
        )
        self.ff = FeedForward(dim, **kw)
        self.ff_context = nnx.data(None if context_pre_only else FeedForward(dim, **kw))

    def __call__(
        self,
        x: Float[Array, "b n d"],
        context: Float[Array, "b m d"],
        temb: Float[Array, "b d"],
    ) -> tuple[Float[Array, "b n d"], Float[Array, "b m d"] | None]:
        """Update the (float32) residual streams; the text output is None if context-pre-only."""
        f32, dt = jnp.float32, self.dtype
        mods = self.norm1(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = layer_norm(x, NORM_EPS)
        h = _modulate(x_norm, shift_msa, scale_msa).astype(dt)

        c_mods = self.norm1_context(temb)
        c_norm = layer_norm(context, NORM_EPS)
        if self.context_pre_only:
            c_scale, c_shift = c_mods
            hc = _modulate(c_norm, c_shift, c_scale).astype(dt)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
            hc = _modulate(c_norm, c_shift_msa, c_scale_msa).astype(dt)

        attn_x, attn_c = self.attn(h, hc)
        x = x + gate_msa[:, None, :] * attn_x.astype(f32)
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            h2 = _modulate(x_norm, shift_msa2, scale_msa2).astype(dt)
            attn2_x, _ = self.attn2(h2)
            x = x + gate_msa2[:, None, :] * attn2_x.astype(f32)
        h = _modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp).astype(dt)
        x = x + gate_mlp[:, None, :] * self.ff(h).astype(f32)

        if self.context_pre_only:
            return x, None
        context = context + c_gate_msa[:, None, :] * attn_c.astype(f32)
        hc = _modulate(layer_norm(context, NORM_EPS), c_shift_mlp, c_scale_mlp).astype(dt)
        context = context + c_gate_mlp[:, None, :] * self.ff_context(hc).astype(f32)
        return x, context


class MMDiT(nnx.Module):
    """SD3 / SD3.5 MM-DiT: ``(latent NHWC, timestep, text states, pooled text) -> velocity NHWC``.

    Args:
        config: the architecture (:class:`~rfmpc.models.configs.MMDiTConfig`).
        dtype: compute dtype of the matmuls (float32 or bfloat16).
        param_dtype: storage dtype of the parameters.
        attention: ``"auto"`` (cuDNN flash attention for half precision on GPU, else XLA),
            ``"xla"`` or ``"cudnn"``; all go through ``jax.nn.dot_product_attention``.
        rngs: initialisation randomness (xavier-uniform linears, adaLN-Zero and a zero final
            projection as in DiT, so the model trains from scratch; loaders overwrite it all).
    """

    def __init__(
        self,
        config: MMDiTConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        attention: str = "auto",
        rngs: nnx.Rngs,
    ):
        if not isinstance(config, MMDiTConfig):
            raise TypeError(f"config must be an MMDiTConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        d = config.inner_dim
        rngs = _KeyStream(rngs.params())
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = PatchEmbed(config, **kw)
        self.time_text_embed = TimestepTextEmbed(
            d, config.pooled_projection_dim, param_dtype=param_dtype, rngs=rngs
        )
        self.context_embedder = _linear(
            config.joint_attention_dim, config.caption_projection_dim, **kw
        )
        n = config.num_layers
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    d,
                    config.num_attention_heads,
                    config.attention_head_dim,
                    context_pre_only=i == n - 1,
                    qk_norm=config.qk_norm,
                    dual=config.is_dual(i),
                    attention=attention,
                    **kw,
                )
                for i in range(n)
            ]
        )
        self.norm_out = AdaLNModulation(d, 2, param_dtype=param_dtype, rngs=rngs)
        p = config.patch_size
        self.proj_out = _linear(d, p * p * config.out_dim, zero=True, **kw)

    def _check_inputs(self, x, timestep, context, pooled):
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be NHWC (b, h, w, {cfg.in_channels}), got shape {x.shape}"
            )
        b, hh, ww, _ = x.shape
        p = cfg.patch_size
        if hh % p or ww % p:
            raise ValueError(
                f"hidden_states height/width ({hh}, {ww}) must be multiples of patch_size={p}"
            )
        j = cfg.joint_attention_dim
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != j:
            raise ValueError(
                f"encoder_hidden_states must be (b={b}, tokens, {cfg.joint_attention_dim}), got "
                f"{context.shape}"
            )
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be (b={b}, {cfg.pooled_projection_dim}), got "
                f"{pooled.shape}"
            )
        t = jnp.asarray(timestep, jnp.float32)
        if t.ndim == 0 or t.shape == (1,):
            t = jnp.broadcast_to(t.reshape(()), (b,))
        elif t.shape != (b,):
            raise ValueError(f"timestep must be a scalar or of shape (b,) = ({b},), got {t.shape}")
        return t

    def __call__(
        self,
        hidden_states: Float[Array, "b h w c"],
        timestep: Float[Array, " b"] | float,
        encoder_hidden_states: Float[Array, "b m j"],
        pooled_projections: Float[Array, "b p"],
    ) -> Float[Array, "b h w o"]:
        """Velocity prediction for latents ``hidden_states`` at ``timestep = sigma * 1000``.

        Returns NHWC of ``out_channels`` channels, in ``hidden_states``' dtype.
        """
        t = self._check_inputs(hidden_states, timestep, encoder_hidden_states, pooled_projections)
        b, hh, ww, _ = hidden_states.shape
        p, co = self.config.patch_size, self.config.out_dim
        h, w = hh // p, ww // p

        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(t, pooled_projections)
        context = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        context = context.astype(jnp.float32)
        for block in self.transformer_blocks:
            x, context = block(x, context, temb)

        scale, shift = self.norm_out(temb)  # AdaLayerNormContinuous: (scale, shift) order
        x = _modulate(layer_norm(x, NORM_EPS), shift, scale).astype(self.dtype)
        x = self.proj_out(x)
        x = x.reshape(b, h, w, p, p, co).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, co)
        return x.astype(hidden_states.dtype)
