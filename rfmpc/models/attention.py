"""Joint (MM-DiT) attention of Stable Diffusion 3, with optional per-head QK-normalisation.

MM-DiT (Esser et al. 2024, arXiv:2403.03206, Sec. 4 and Fig. 2) keeps separate weights for the
image and the text tokens but lets both attend to the concatenated sequence ``[image; text]``.
QK-normalisation (RMSNorm per head, Sec. 5.3.2 there; Henry et al. 2020) stabilises training at
scale; SD3.5 uses it. Layout is BTNH throughout (batch, tokens, heads, head channels), which is
what ``jax.nn.dot_product_attention`` takes: no transposes on the hot path.

Numerics: projections run in the compute ``dtype``; QK-norms and the softmax run in float32.

Speed (measured on CPU, ``benchmarks/mmdit_speed.py``): each stream's Q, K and V come from one
matmul against the three kernels side by side (one GEMM of width ``3 * inner`` instead of three),
and the ``"xla"`` attention is written out as two batched matmuls in BNTH layout with the
``1/sqrt(h)`` scale folded into the (small) query and the softmax normalisation applied to the
(small) output rather than to the ``t x s`` probabilities. The checkpoint layout is unchanged:
``to_q``, ``to_k`` and ``to_v`` stay separate parameters, so loaders and gradients see diffusers'
structure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "JointAttention",
    "LayerNorm",
    "RMSNorm",
    "attend",
    "attend_xla",
    "fused_qkv",
    "layer_norm",
    "make_qk_norm",
    "rms_norm",
]

#: eps of the QK-norms: diffusers builds SD3's ``Attention(..., eps=1e-6)``.
QK_NORM_EPS = 1e-6


def rms_norm(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, computed and returned in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_norm(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """Non-affine LayerNorm over the last axis (biased variance), computed in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


def _lastdim(v: Array, ndim: int) -> Array:
    """A per-channel vector as float32, shaped to broadcast over the last axis of rank ``ndim``."""
    return v.astype(jnp.float32).reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel ``weight`` (Zhang & Sennrich 2019, arXiv:1910.07467)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        y = rms_norm(x, self.eps) * _lastdim(self.weight[...], x.ndim)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al. 2016) in float32, with or without a learned ``weight``/``bias``."""

    def __init__(self, dim: int, *, eps: float, affine: bool, param_dtype=jnp.float32):
        self.eps = eps
        if affine:
            self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
            self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        else:
            self.weight = nnx.data(None)
            self.bias = nnx.data(None)

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        y = layer_norm(x, self.eps)
        if self.weight is not None:
            y = y * _lastdim(self.weight[...], x.ndim) + _lastdim(self.bias[...], x.ndim)
        return y.astype(x.dtype)


def make_qk_norm(kind: str | None, head_dim: int, *, param_dtype=jnp.float32):
    """The per-head query/key normalisation diffusers builds for ``qk_norm=kind`` (or None)."""
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps=QK_NORM_EPS, param_dtype=param_dtype)
    if kind == "layer_norm":
        return LayerNorm(head_dim, eps=QK_NORM_EPS, affine=True, param_dtype=param_dtype)
    if kind == "fp32_layer_norm":
        return LayerNorm(head_dim, eps=QK_NORM_EPS, affine=False, param_dtype=param_dtype)
    raise ValueError(
        f"qk_norm={kind!r} is not supported; use None, 'rms_norm', 'layer_norm' or "
        "'fp32_layer_norm'"
    )


#: ``"xla"``: :func:`attend_xla`, matmul-softmax-matmul that XLA compiles for any backend and
#: dtype. ``"cudnn"``: cuDNN flash attention (GPU, bf16/fp16 only). ``"auto"``: cuDNN when the
#: default backend is a GPU and the inputs are half precision and cuDNN accepts the shapes, else
#: ``"xla"``.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attend_xla(
    q: Float[Array, "b t n h"],
    k: Float[Array, "b s n h"],
    v: Float[Array, "b s n h"],
) -> Float[Array, "b t n h"]:
    """``softmax(q k^T / sqrt(h)) v`` as two batched matmuls in BNTH layout, softmax in float32.

    Same result as ``jax.nn.dot_product_attention(..., implementation="xla")`` (to float32
    rounding) with less work on the ``t x s`` logits, which dominate at small widths:

    - float32 inputs: the ``1/sqrt(h)`` scale multiplies ``q`` (``t x h``) instead of the logits;
      half precision keeps it on the float32 logits (rescaling a bf16 ``q`` would round twice);
    - the probabilities are left unnormalised (``exp(s - max)``) and the output row is divided
      by their sum afterwards (``t x h`` divisions instead of ``t x s``);
    - explicit BNTH operands, so both matmuls are plain batched GEMMs on CPU (measured ~30%
      faster than ``jax.nn.dot_product_attention``'s XLA path on the 2-core CPU at 288 tokens).
    """
    h = q.shape[-1]
    scale = h**-0.5
    f32 = jnp.float32
    prescale = q.dtype == f32
    if prescale:
        q = q * scale
    qt = jnp.transpose(q, (0, 2, 1, 3))  # b n t h
    kt = jnp.transpose(k, (0, 2, 1, 3))  # b n s h
    vt = jnp.transpose(v, (0, 2, 1, 3))  # b n s h
    logits = jnp.einsum("bnth,bnsh->bnts", qt, kt, preferred_element_type=f32)
    if not prescale:
        logits = logits * scale
    # The max only stabilises exp; softmax does not depend on it, so no gradient flows through.
    logits_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits - logits_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)  # b n t 1
    out = jnp.einsum("bnts,bnsh->bnth", p.astype(v.dtype), vt, preferred_element_type=f32)
    out = out / denom
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def attend(
    q: Float[Array, "b t n h"],
    k: Float[Array, "b s n h"],
    v: Float[Array, "b s n h"],
    implementation: str = "auto",
) -> Float[Array, "b t n h"]:
    """``softmax(q k^T / sqrt(h)) v`` in BTNH layout.

    ``"cudnn"`` goes through ``jax.nn.dot_product_attention``; ``"xla"`` is :func:`attend_xla`.
    The softmax is computed in float32 for every implementation.
    """
    if implementation == "auto":
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        if half and jax.default_backend() == "gpu":
            try:  # cuDNN validates shapes, dtypes and its version while tracing
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                pass
        implementation = "xla"
    if implementation == "xla":
        return attend_xla(q, k, v)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    raise ValueError(f"implementation={implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}")


def fused_qkv(
    x: Float[Array, "b t d"],
    projections: tuple[nnx.Linear, nnx.Linear, nnx.Linear],
    num_heads: int,
    head_dim: int,
) -> tuple[Float[Array, "b t n h"], Float[Array, "b t n h"], Float[Array, "b t n h"]]:
    """Q, K and V of ``x`` from one matmul against the three projections' kernels side by side.

    The same numbers as calling the three ``nnx.Linear`` layers (matmul in their compute dtype,
    then the bias), from one GEMM of width ``3 * n * h``: one read of ``x`` instead of three and
    one kernel launch instead of three. The parameters stay the three separate layers'
    (checkpoint layout unchanged); the concatenation is a copy of the kernels, small next to the
    activations it saves re-reading.
    """
    first = projections[0]
    dtype = first.dtype or x.dtype
    kernel = jnp.concatenate([p.kernel[...].astype(dtype) for p in projections], axis=1)
    y = jnp.dot(x.astype(dtype), kernel)
    biases = [p.bias for p in projections]
    if all(b is not None for b in biases):
        y = y + jnp.concatenate([b[...].astype(dtype) for b in biases])[None, None, :]
    elif any(b is not None for b in biases):
        raise ValueError("fused_qkv needs either all three projections with a bias or none")
    b, t, _ = x.shape
    y = y.reshape(b, t, 3, num_heads, head_dim)
    return y[:, :, 0], y[:, :, 1], y[:, :, 2]


def _linear(din, dout, *, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.xavier_uniform(),
        rngs=rngs,
    )


class JointAttention(nnx.Module):
    """Multi-head attention over ``[image; text]`` tokens with per-stream projections.

    With ``with_context=True`` this is SD3's joint attention (diffusers' ``Attention`` with
    ``added_kv_proj_dim`` and ``JointAttnProcessor2_0``): image tokens use ``to_q/to_k/to_v``,
    text tokens ``add_q_proj/add_k_proj/add_v_proj``, both attend to the concatenation and are
    projected back by ``to_out`` / ``to_add_out``. ``context_pre_only=True`` (the last block)
    drops ``to_add_out`` and returns no text output. With ``with_context=False`` it is plain
    self-attention on the image tokens (SD3.5's second attention ``attn2``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        *,
        qk_norm: str | None = None,
        with_context: bool = True,
        context_pre_only: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        implementation: str = "auto",
        rngs: nnx.Rngs | object,  # or rfmpc.models.mmdit._KeyStream (has .params())
    ):
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r}; use one of {ATTENTION_IMPLEMENTATIONS}"
            )
        self.implementation = implementation
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        lin = lambda a, b: _linear(a, b, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = lin(dim, inner)
        self.to_k = lin(dim, inner)
        self.to_v = lin(dim, inner)
        self.to_out = lin(inner, dim)
        self.norm_q = nnx.data(make_qk_norm(qk_norm, head_dim, param_dtype=param_dtype))
        self.norm_k = nnx.data(make_qk_norm(qk_norm, head_dim, param_dtype=param_dtype))
        self.with_context = with_context
        self.context_pre_only = context_pre_only
        if with_context:
            self.add_q_proj = lin(dim, inner)
            self.add_k_proj = lin(dim, inner)
            self.add_v_proj = lin(dim, inner)
            self.to_add_out = nnx.data(None if context_pre_only else lin(inner, dim))
            self.norm_added_q = nnx.data(make_qk_norm(qk_norm, head_dim, param_dtype=param_dtype))
            self.norm_added_k = nnx.data(make_qk_norm(qk_norm, head_dim, param_dtype=param_dtype))

    def _qkv(self, x, proj_q, proj_k, proj_v, norm_q, norm_k):
        q, k, v = fused_qkv(x, (proj_q, proj_k, proj_v), self.num_heads, self.head_dim)
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v

    def __call__(
        self,
        x: Float[Array, "b n d"],
        context: Float[Array, "b m d"] | None = None,
    ) -> tuple[Float[Array, "b n d"], Float[Array, "b m d"] | None]:
        """Attend; returns ``(image_out, text_out)`` (``text_out`` None without text output)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        n = x.shape[1]
        if context is not None:
            if not self.with_context:
                raise ValueError("this attention has no text projections; pass context=None")
            cq, ck, cv = self._qkv(
                context,
                self.add_q_proj,
                self.add_k_proj,
                self.add_v_proj,
                self.norm_added_q,
                self.norm_added_k,
            )
            q = jnp.concatenate([q, cq.astype(q.dtype)], axis=1)
            k = jnp.concatenate([k, ck.astype(k.dtype)], axis=1)
            v = jnp.concatenate([v, cv.astype(v.dtype)], axis=1)
        b, t = q.shape[:2]
        out = attend(q, k, v, self.implementation).reshape(b, t, self.num_heads * self.head_dim)
        x_out = self.to_out(out[:, :n])
        if context is None or self.to_add_out is None:
            return x_out, None
        return x_out, self.to_add_out(out[:, n:])
