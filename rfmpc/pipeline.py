"""prompt -> conditioning -> sample -> decode, for SD3 folders and the embedded default model.

:func:`load_pipeline` builds a :class:`Pipeline` from

* ``None``: the embedded default model shipped in ``rfmpc/assets/embedded`` (a small pixel-space
  MM-DiT trained by this project, with its own text encoder);
* a local diffusers ``StableDiffusion3Pipeline`` folder (``model_index.json`` + transformer, vae,
  text_encoder (CLIP-L), text_encoder_2 (CLIP-G), optional text_encoder_3 (T5) and tokenizers),
  converted on load without torch.

Both go through the same code: a text encoder produces ``{"embeds", "pooled"}``, the MM-DiT is a
pure :class:`ModelField` ``v(x, sigma, cond)``, classifier-free guidance wraps it, the flow core
integrates it on the FlowMatch grid (so states can be captured at any step for the cache), and a
codec decodes latents to images. The SD3 prompt encoding mirrors diffusers exactly: CLIP-L and
CLIP-G penultimate hidden states concatenated on the feature axis and zero-padded to the T5
width, followed on the sequence axis by T5's states (zeros if T5 is absent), and the two pooled
projections concatenated.

Numerical faults: a pipeline call never returns a NaN image. If the model produces NaN/inf
latents, :meth:`Pipeline.__call__` raises ``FloatingPointError`` naming the first bad denoising
step, its sigma and the prompts (the failing segment is re-run step by step to locate it, so
the cost is paid on failure only).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from rfmpc.flow import (
    TrajectoryState,
    classifier_free_guidance,
    flowmatch_sigmas,
    integrate,
    integrate_path,
)
from rfmpc.sharding import (
    DATA,
    FSDP,
    MIN_SHARD_SIZE,
    BatchShardedField,
    Shardable,
    check_mesh,
    gather,
    shard_batch,
    shard_params,
)

__all__ = [
    "EMBEDDED_DIR",
    "ModelField",
    "Pipeline",
    "PipelineOutput",
    "PixelCodec",
    "UnknownWordsWarning",
    "VAECodec",
    "load_pipeline",
]

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "embedded"


# ----------------------------------------------------------------------------- the model field
class ModelField(eqx.Module):
    """An MM-DiT as a velocity field ``v(x, sigma, {"embeds", "pooled"})`` (pure, a pytree)."""

    transformer: Any

    def __call__(self, x: Float[Array, "b h w c"], sigma, cond) -> Float[Array, "b h w c"]:
        t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32) * jnp.float32(1000.0), x.shape[:1])
        tr = self.transformer
        v = tr.apply(tr.params, x, t, cond["embeds"], cond["pooled"], buffers=tr.buffers)
        return v.astype(x.dtype)


# ----------------------------------------------------------------------------- codecs
class PixelCodec:
    """Pixel-space "latents": images in [0, 1] <-> model space [-1, 1] (the embedded model)."""

    latent_channels = 3
    downscale = 1

    def decode(self, latents: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        return jnp.clip((latents + 1.0) * 0.5, 0.0, 1.0)

    def encode(self, images: Float[Array, "b h w c"]) -> Float[Array, "b h w c"]:
        return jnp.asarray(images, jnp.float32) * 2.0 - 1.0

    def describe(self) -> dict:
        return {"codec": "pixel"}

    def shard(self, mesh, *, min_size: int = MIN_SHARD_SIZE) -> PixelCodec:
        """No weights: the codec itself (:class:`rfmpc.sharding.Shardable`)."""
        return self


class VAECodec:
    """SD3's VAE: model latents <-> images, with the config's scaling and shift factors."""

    downscale = 8

    def __init__(self, vae):
        from flax import nnx

        self.vae = vae
        self.config = vae.config
        self.latent_channels = vae.config.latent_channels
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)
        graphdef, state = nnx.split(vae)
        self._state = state
        self._decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
        self._encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])

    def _scale_shift(self):
        shift = self.config.shift_factor or 0.0
        return self.config.scaling_factor, shift

    def decode(self, latents: Float[Array, "b h w c"]) -> Float[Array, "b H W 3"]:
        scale, shift = self._scale_shift()
        z = latents / scale + shift
        img = self._decode(self._state, z)
        return jnp.clip(img * 0.5 + 0.5, 0.0, 1.0)

    def encode(self, images: Float[Array, "b H W 3"]) -> Float[Array, "b h w c"]:
        scale, shift = self._scale_shift()
        mean = self._encode(self._state, jnp.asarray(images, jnp.float32) * 2.0 - 1.0)
        return (mean - shift) * scale

    def describe(self) -> dict:
        return {"codec": "vae", **dataclasses.asdict(self.config)}

    def shard(self, mesh, *, min_size: int = MIN_SHARD_SIZE) -> VAECodec:
        """A copy whose VAE weights are placed on ``mesh`` by the FSDP rule
        (:func:`rfmpc.sharding.shard_params`); the jitted decode/encode take them as argument."""
        out = copy.copy(self)
        out._state = shard_params(self._state, mesh, min_size=min_size)
        return out


# ----------------------------------------------------------------------------- text encoders
class UnknownWordsWarning(UserWarning):
    """A prompt has words the embedded model's vocabulary does not hold (they are ignored)."""


_VALID_EXAMPLE = "a red circle at the top left on a blue background"


def check_vocabulary(text_encoder, prompts: Sequence[str], strict: bool) -> None:
    """Warn (``strict=False``) or raise ``ValueError`` (``strict=True``) if ``prompts`` contain
    words the text encoder cannot represent. Encoders with an open vocabulary (SD3's CLIP / T5
    byte-level tokenizers) have no ``unknown_words`` and pass."""
    probe = getattr(text_encoder, "unknown_words", None)
    if probe is None:
        return
    bad = probe(list(prompts))
    if not bad:
        return
    from rfmpc.data.grammar import VOCABULARY

    words = sorted({w for ws in bad.values() for w in ws})
    msg = (
        f"{len(bad)} prompt(s) contain words outside the embedded model's vocabulary, which "
        f"it ignores: {words}; e.g. {next(iter(bad))!r}. The embedded model knows the "
        f"procedural grammar ({len(VOCABULARY)} words: shapes, colours, positions, sizes, "
        f"backgrounds), e.g. {_VALID_EXAMPLE!r}; load an SD3 folder (--model) for open prompts"
        + ("" if strict else "; strict=True (CLI: --strict) makes this an error")
    )
    if strict:
        raise ValueError(msg)
    import warnings

    warnings.warn(msg, UnknownWordsWarning, stacklevel=3)


class EmbeddedTextEncoder:
    """The embedded model's small text encoder: prompts -> ``{"embeds", "pooled"}``."""

    def __init__(self, prompt_encoder):
        self.encoder = prompt_encoder

    def __call__(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> dict:
        seq, pooled = self.encoder.encode(list(prompts))
        return {"embeds": seq, "pooled": pooled}

    def pooled(self, prompts: Sequence[str]) -> Float[Array, "b p"]:
        return self.encoder.encode(list(prompts))[1]

    def unknown_words(self, prompts: Sequence[str]) -> dict[str, list[str]]:
        """Prompt -> its words outside this encoder's vocabulary (prompts without any omitted)."""
        tok = self.encoder.tokenizer
        out = {p: tok.unknown_words(p) for p in prompts}
        return {p: w for p, w in out.items() if w}

    def shard(self, mesh, *, min_size: int = MIN_SHARD_SIZE) -> EmbeddedTextEncoder:
        """The encoder itself: the embedded model's small text encoder stays where it is."""
        return self


class SD3TextEncoders:
    """CLIP-L + CLIP-G (+ optional T5) exactly as diffusers' ``StableDiffusion3Pipeline``."""

    def __init__(self, clip_l, clip_g, t5, tok_l, tok_g, tok_t5, joint_attention_dim: int):
        from flax import nnx

        self.tok_l, self.tok_g, self.tok_t5 = tok_l, tok_g, tok_t5
        self.joint_attention_dim = joint_attention_dim
        self.has_t5 = t5 is not None

        def clip_fn(module):
            g, s = nnx.split(module)

            def run(s, ids):
                out = nnx.merge(g, s)(ids)
                return out.penultimate, out.text_embeds

            return jax.jit(run), s

        self._clip_l, self._s_l = clip_fn(clip_l)
        self._clip_g, self._s_g = clip_fn(clip_g)
        if t5 is not None:
            g5, s5 = nnx.split(t5)
            self._t5 = jax.jit(lambda s, ids: nnx.merge(g5, s)(ids))
            self._s_t5 = s5

    @staticmethod
    def _ids(tokenizer, prompts, max_length):
        out = tokenizer(
            list(prompts),
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="np",
        )
        return jnp.asarray(out["input_ids"], jnp.int32)

    def __call__(self, prompts: Sequence[str], max_sequence_length: int = 256) -> dict:
        prompts = list(prompts)
        max_l = self.tok_l.model_max_length
        e_l, p_l = self._clip_l(self._s_l, self._ids(self.tok_l, prompts, max_l))
        e_g, p_g = self._clip_g(self._s_g, self._ids(self.tok_g, prompts, max_l))
        clip = jnp.concatenate([e_l, e_g], axis=-1)
        if self.has_t5:
            t5 = self._t5(self._s_t5, self._ids(self.tok_t5, prompts, max_sequence_length))
        else:
            t5 = jnp.zeros(
                (len(prompts), max_sequence_length, self.joint_attention_dim), clip.dtype
            )
        pad = t5.shape[-1] - clip.shape[-1]
        if pad < 0:
            raise ValueError(
                f"CLIP features ({clip.shape[-1]}) are wider than the joint attention dim "
                f"({t5.shape[-1]}): the text encoders do not match the transformer"
            )
        clip = jnp.pad(clip, ((0, 0), (0, 0), (0, pad)))
        embeds = jnp.concatenate([clip, t5.astype(clip.dtype)], axis=-2)
        return {"embeds": embeds, "pooled": jnp.concatenate([p_l, p_g], axis=-1)}

    def pooled(self, prompts: Sequence[str]) -> Float[Array, "b p"]:
        max_l = self.tok_l.model_max_length
        _, p_l = self._clip_l(self._s_l, self._ids(self.tok_l, prompts, max_l))
        _, p_g = self._clip_g(self._s_g, self._ids(self.tok_g, prompts, max_l))
        return jnp.concatenate([p_l, p_g], axis=-1)

    def shard(self, mesh, *, min_size: int = MIN_SHARD_SIZE) -> SD3TextEncoders:
        """A copy whose CLIP-L, CLIP-G (and T5) weights are placed on ``mesh`` by the FSDP rule
        (:func:`rfmpc.sharding.shard_params`)."""
        out = copy.copy(self)
        out._s_l = shard_params(self._s_l, mesh, min_size=min_size)
        out._s_g = shard_params(self._s_g, mesh, min_size=min_size)
        if self.has_t5:
            out._s_t5 = shard_params(self._s_t5, mesh, min_size=min_size)
        return out


# ----------------------------------------------------------------------------- the pipeline
@dataclasses.dataclass
class PipelineOutput:
    """``images`` (NHWC float32 in [0, 1], a list of PIL images, or latents), the final latents,
    and the :class:`TrajectoryState` captured at each requested step."""

    images: Any
    latents: Array
    states: dict[int, TrajectoryState]
    sigmas: Array


def _resolve_meter(progress: bool, meter: Any) -> diffrax.AbstractProgressMeter:
    """``progress=True`` is shorthand for a per-step tqdm bar; ``progress_meter=`` is the object."""
    if not isinstance(meter, diffrax.AbstractProgressMeter):
        raise TypeError(
            f"progress_meter must be a diffrax.AbstractProgressMeter, got {type(meter).__name__}; "
            "pass diffrax.TqdmProgressMeter(), diffrax.TextProgressMeter() or progress=True"
        )
    if not progress:
        return meter
    if not isinstance(meter, diffrax.NoProgressMeter):
        raise ValueError(
            "give progress=True or progress_meter=, not both (progress=True means "
            "progress_meter=diffrax.TqdmProgressMeter(refresh_steps=1))"
        )
    return diffrax.TqdmProgressMeter(refresh_steps=1)


@dataclasses.dataclass
class Pipeline:
    """A text-to-image rectified-flow pipeline (see the module docstring).

    Attributes:
        transformer: the loaded MM-DiT (:class:`rfmpc.models.Transformer`).
        text_encoder: prompts -> ``{"embeds", "pooled"}`` (``.pooled(prompts)`` for the cache).
        codec: latents <-> images.
        shift: the FlowMatch shift of the scheduler.
        model_id: a name for this model (cache entries from another model are never used).
        default_size: default image (height, width) in pixels.
        default_steps / default_guidance: defaults for :meth:`__call__`.
        mesh: a :class:`jax.sharding.Mesh` (``rfmpc.sharding``) the weights were placed on by
            ``load_pipeline(..., mesh=)``; calls then split the batch over its ``"data"`` axis.
            None (default): one device.
    """

    transformer: Any
    text_encoder: Any
    codec: Any
    shift: float = 3.0
    model_id: str = "model"
    default_size: tuple[int, int] = (1024, 1024)
    default_steps: int = 28
    default_guidance: float = 7.0
    mu: float | None = None
    mesh: Any = None

    @property
    def field(self) -> ModelField:
        return ModelField(self.transformer)

    def field_in(self, compute_dtype=None) -> ModelField:
        """``field`` with the network's matmuls in ``compute_dtype`` (None: as loaded).

        ``compute_dtype=jnp.float32`` on a pipeline loaded in bfloat16 keeps the bf16 weights
        (upcast exactly) and runs every matmul in float32: what gradient-based controllers
        (shooting, MPC linearisation, MPC-Flow) should use; see ``docs/performance.md`` for the
        measured gradient errors of bf16 compute.
        """
        if compute_dtype is None:
            return self.field
        return ModelField(self.transformer.astype(compute_dtype))

    def guided_field(self, guidance_scale: float, *, compute_dtype=None):
        """``field`` with CFG (``cond = (cond, uncond)``); ``compute_dtype``: see ``field_in``."""
        return classifier_free_guidance(self.field_in(compute_dtype), guidance_scale)

    def config_hash(self, latent_shape: tuple[int, ...], num_steps: int) -> str:
        """Identity of (model, latent shape, schedule): cache entries must match it exactly."""
        rec = {
            "model_id": self.model_id,
            "mmdit": self.transformer.config.to_diffusers(),
            "codec": self.codec.describe(),
            "latent_shape": list(latent_shape[1:]),
            "num_steps": int(num_steps),
            "shift": self.shift,
            "mu": self.mu,
        }
        return hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()

    def sigmas(self, num_steps: int) -> Float[Array, " n_plus_1"]:
        return flowmatch_sigmas(num_steps, self.shift, mu=self.mu)

    def latent_shape(self, batch: int, height: int | None, width: int | None) -> tuple:
        for name, v in (("height", height), ("width", width)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise TypeError(f"{name} must be an int number of pixels or None, got {v!r}")
            if v is not None and v < 1:
                raise ValueError(
                    f"{name} must be a positive number of pixels, got {v}; pass None for the "
                    f"model's default {self.default_size}"
                )
        h = self.default_size[0] if height is None else int(height)
        w = self.default_size[1] if width is None else int(width)
        f = self.codec.downscale * self.transformer.config.patch_size
        if h % f or w % f:
            raise ValueError(
                f"height and width must be multiples of {f} (VAE factor {self.codec.downscale} x "
                f"patch {self.transformer.config.patch_size}), got {h}x{w}"
            )
        return (
            batch,
            h // self.codec.downscale,
            w // self.codec.downscale,
            self.codec.latent_channels,
        )

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        max_sequence_length: int = 256,
    ) -> tuple[dict, dict]:
        """``(cond, uncond)`` conditioning pytrees for a batch of prompts (negative default "")."""
        prompts = _as_list(prompt, "prompt")
        if negative_prompt is None:
            negs = [""] * len(prompts)
        else:
            negs = _as_list(negative_prompt, "negative_prompt")
            if len(negs) == 1 and len(prompts) > 1:
                negs = negs * len(prompts)
            if len(negs) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negs)} entries but prompt has {len(prompts)}; "
                    "give one negative prompt or one per prompt"
                )
        both = self.text_encoder(prompts + negs, max_sequence_length)
        n = len(prompts)
        cond = jax.tree.map(lambda a: a[:n], both)
        uncond = jax.tree.map(lambda a: a[n:], both)
        return cond, uncond

    def decode(self, latents: Float[Array, "b h w c"]) -> Float[Array, "b H W 3"]:
        return self.codec.decode(latents)

    def shard(self, mesh, *, min_size: int = MIN_SHARD_SIZE) -> Pipeline:
        """A copy whose weights live on ``mesh``; calling it splits the batch over ``"data"``.

        Each component places itself through its declared ``shard(mesh, *, min_size)`` method
        (:class:`rfmpc.sharding.Shardable`): the MM-DiT's parameters and buffers, the VAE's and
        the SD3 text encoders' weights by the FSDP rule (:func:`rfmpc.sharding.shard_params`);
        the pixel codec and the embedded model's small text encoder stay as they are. A codec or
        text encoder of your own without a ``shard`` method is left where it is. The copy's
        ``mesh`` is set; the original pipeline is not modified.

        Raises ``TypeError``/``ValueError`` for a mesh without the ``"data"`` and ``"fsdp"`` axes
        and ``TypeError`` for a transformer that cannot shard itself.
        """
        check_mesh(mesh, DATA, FSDP)
        if not isinstance(self.transformer, Shardable):
            raise TypeError(
                "pipe.transformer must be a Transformer (or declare shard(mesh, *, min_size)), "
                f"got {type(self.transformer)}"
            )

        def place(component):
            if isinstance(component, Shardable):
                return component.shard(mesh, min_size=min_size)
            return component

        return dataclasses.replace(
            self,
            transformer=self.transformer.shard(mesh, min_size=min_size),
            codec=place(self.codec),
            text_encoder=place(self.text_encoder),
            mesh=mesh,
        )

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: Array | None = None,
        max_sequence_length: int = 256,
        seed: int | None = None,
        key: Array | None = None,
        output_type: str = "np",
        return_states: Sequence[int] = (),
        progress: bool = False,
        progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter(),
        mesh: Any = None,
        strict: bool = False,
    ) -> PipelineOutput:
        """Generate images (diffusers' ``StableDiffusion3Pipeline.__call__`` semantics).

        Args:
            prompt: one prompt or a list (the batch).
            negative_prompt: for classifier-free guidance (default "").
            num_inference_steps: Euler steps N (default: the model's, 28).
            guidance_scale: CFG scale (<= 1 disables CFG).
            height, width: image size in pixels (default: the model's).
            latents: initial noise, NHWC (default: ``jax.random.normal(key, shape)``).
            max_sequence_length: T5 tokens (SD3 only).
            seed / key: randomness for the initial noise (one of them, or ``latents``).
            output_type: ``"np"`` (NHWC float32 in [0, 1]), ``"pil"`` or ``"latent"``.
            return_states: steps k at which to capture the :class:`TrajectoryState` (0..N).
            progress: show a tqdm bar over the denoising steps (shorthand for
                ``progress_meter=diffrax.TqdmProgressMeter(refresh_steps=1)``).
            progress_meter: a ``diffrax.AbstractProgressMeter`` passed into the solve
                (default ``diffrax.NoProgressMeter()``). Its state lives in this call's solve,
                so concurrent pipelines each drive their own meter; the images do not depend
                on it. With ``return_states`` the grid is solved in segments, one meter each.
            strict: raise ``ValueError`` instead of warning (:class:`UnknownWordsWarning`) when
                a prompt has words the embedded model's vocabulary lacks (an SD3 folder's
                encoders have an open vocabulary: nothing to check).
            mesh: a ``rfmpc.sharding`` mesh (default: the pipeline's own, ``self.mesh``; None =
                one device): the noise, the conditioning and every model call are split over
                its ``"data"`` axis; the number of prompts must be a multiple of that axis size
                (``ValueError`` otherwise). Weights are sharded only by ``load_pipeline(...,
                mesh=)``; a mesh given here alone replicates them.
        """
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        g = self.default_guidance if guidance_scale is None else guidance_scale
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        if not (isinstance(g, (int, float)) and np.isfinite(g) and g >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {g!r}")
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        meter = _resolve_meter(progress, progress_meter)
        prompts = _as_list(prompt, "prompt")
        check_vocabulary(self.text_encoder, prompts, strict)
        shape = self.latent_shape(len(prompts), height, width)
        if latents is None:
            if key is None:
                if seed is None:
                    raise ValueError("give seed=, key= or latents= (randomness is explicit)")
                if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                    raise TypeError(f"seed must be an int, got {seed!r}")
                if not -(2**63) <= int(seed) < 2**63:
                    raise ValueError(
                        f"seed must be a 64-bit integer in [-2**63, 2**63 - 1], got {seed}; "
                        "pick a smaller seed"
                    )
                key = jax.random.key(int(seed))
            elif not isinstance(key, jax.Array):
                raise TypeError(
                    f"key must be a jax PRNG key array, got {type(key).__name__}; pass "
                    "key=jax.random.key(seed) or seed=<int>"
                )
            latents = jax.random.normal(key, shape, jnp.float32)
        else:
            latents = jnp.asarray(latents)
            if latents.shape != shape:
                raise ValueError(
                    f"latents must have shape {shape} (NHWC) for {len(prompts)} prompt(s) at this "
                    f"size, got {latents.shape}"
                )
            if not jnp.issubdtype(latents.dtype, jnp.floating):
                raise TypeError(
                    f"latents must be floating-point noise, got dtype {latents.dtype}; pass "
                    "jax.random.normal(key, shape) or latents.astype(jnp.float32)"
                )
            if not bool(jnp.all(jnp.isfinite(latents))):
                raise ValueError(
                    "latents contain NaN or inf; pass finite noise, e.g. "
                    "jax.random.normal(key, shape)"
                )
        ks = sorted({int(k) for k in return_states})
        if any(k < 0 or k > steps for k in ks):
            raise ValueError(f"return_states must be steps in [0, {steps}], got {list(ks)}")
        cond, uncond = self.encode_prompt(
            prompts, negative_prompt, max_sequence_length=max_sequence_length
        )
        mesh = self.mesh if mesh is None else mesh
        if mesh is None:
            field = self.guided_field(g)
        else:
            latents, cond, uncond = shard_batch((latents, cond, uncond), mesh)
            # pin both the model's [uncond; cond] batch and the guided velocity to "data"
            guided = classifier_free_guidance(BatchShardedField(self.field, mesh), g)
            field = BatchShardedField(guided, mesh)
        sig = self.sigmas(steps)
        meta = {
            "model_id": self.model_id,
            "prompt": prompts[0] if len(prompts) == 1 else "",
            "guidance_scale": float(g),
        }
        state = TrajectoryState(
            x=latents, step=0, sigmas=sig, key=key, cond=(cond, uncond), meta=meta
        )
        states: dict[int, TrajectoryState] = {}
        try:
            for k in [*ks, steps]:
                if k > int(state.step):
                    start_state = state
                    state = integrate(field, state, stop=k, progress_meter=meter)
                    if not bool(np.asarray(_finite(state.x).addressable_data(0))):
                        _raise_nonfinite(field, start_state, k, prompts)
                if k in ks:
                    states[k] = state
        finally:
            if not isinstance(meter, diffrax.NoProgressMeter):
                jax.effects_barrier()  # the meter's closing callback has run before we return
        if mesh is not None:  # XLA may hand the solver loop's output back replicated: re-split
            state = eqx.tree_at(lambda s: s.x, state, shard_batch(state.x, mesh))
        images = state.x if output_type == "latent" else self.decode(state.x)
        if mesh is not None:
            images = gather(images)  # multi-host: every process gets the whole batch
        if output_type == "pil":
            images = to_pil(images)
        elif output_type == "np":
            images = np.asarray(images, np.float32)
        return PipelineOutput(images=images, latents=state.x, states=states, sigmas=sig)


@jax.jit
def _finite(x):
    return jnp.all(jnp.isfinite(x))  # one replicated scalar, also for multi-process arrays


def _raise_nonfinite(field, start: TrajectoryState, stop: int, prompts: list[str]):
    """Locate the first denoising step (and images) with non-finite latents and raise.

    Called only after a segment ended non-finite: re-runs that segment step by step (the cost
    is paid on failure only) so the error names the step, its sigma and the prompts.
    """
    k0 = int(start.step)
    if not start.x.is_fully_addressable:  # spread over processes: no per-step search
        raise FloatingPointError(
            f"denoising steps {k0}..{stop - 1} produced NaN/inf latents: the model's velocity "
            "is non-finite there, so no image is returned"
        )
    if not bool(jnp.all(jnp.isfinite(start.x))):
        step, bad = k0, ~jnp.all(jnp.isfinite(start.x).reshape(start.x.shape[0], -1), axis=1)
    else:
        _, xs = integrate_path(field, start, stop=stop)
        ok = np.isfinite(np.asarray(xs)).reshape(xs.shape[0], xs.shape[1], -1).all(axis=2)
        first = int(np.argmax(~ok.all(axis=1)))  # xs[first] is the first non-finite state
        step, bad = k0 + first - 1, ~ok[first]
    sig = np.asarray(start.sigmas)
    which = [f"{int(i)}: {prompts[int(i)]!r}" for i in np.nonzero(np.asarray(bad))[0]]
    raise FloatingPointError(
        f"denoising step {step} of {len(sig) - 1} (sigma {sig[step]:.4g} -> {sig[step + 1]:.4g}) "
        f"produced NaN/inf latents for prompt(s) {', '.join(which)}: the model's velocity is "
        "non-finite there, so no image is returned (try float32 instead of bf16/fp16 weights, a "
        "lower guidance_scale, or check the checkpoint)"
    )


def _as_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, Sequence) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(
            f"{name} must be a string or a list of strings, got {type(prompt).__name__}"
        )
    if len(prompt) == 0:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    return list(prompt)


def to_pil(images) -> list:
    """NHWC float images in [0, 1] -> a list of ``PIL.Image`` (RGB)."""
    from PIL import Image

    arr = np.asarray(images, np.float32)
    return [Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8)) for a in arr]


# ----------------------------------------------------------------------------- loading
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} is missing") from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON: {e}; restore it from the original download"
        ) from e


def _load_embedded(folder: Path, dtype) -> Pipeline:
    from rfmpc.data.text_encoder_io import load_text_encoder
    from rfmpc.models import load_transformer

    index = _read_json(folder / "model_index.json")
    te_dir = (folder / index.get("text_encoder", "text_encoder")).resolve()
    transformer = load_transformer(folder / "transformer", dtype=dtype)
    enc = load_text_encoder(te_dir)
    return Pipeline(
        transformer=transformer,
        text_encoder=EmbeddedTextEncoder(enc),
        codec=PixelCodec(),
        shift=float(index.get("shift", 1.0)),
        model_id=index.get("model_id", "rfmpc-embedded"),
        default_size=tuple(index.get("default_size", (32, 32))),
        default_steps=int(index.get("default_steps", 28)),
        default_guidance=float(index.get("default_guidance", 4.0)),
    )


def _load_sd3(folder: Path, index: dict, dtype) -> Pipeline:
    from transformers import AutoTokenizer

    from rfmpc.convert import load_component

    def present(name):
        entry = index.get(name)
        return isinstance(entry, list) and entry[0] is not None and (folder / name).is_dir()

    for name in (
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ):
        if not present(name):
            raise FileNotFoundError(
                f"{folder} is not a complete SD3 pipeline folder: component {name!r} is missing "
                "(expected a subfolder and an entry in model_index.json)"
            )
    transformer = load_component(folder / "transformer", "mmdit", dtype)

    def tok(name):
        return AutoTokenizer.from_pretrained(str(folder / name), local_files_only=True)

    t5 = (
        load_component(folder / "text_encoder_3", "t5", dtype)
        if present("text_encoder_3")
        else None
    )
    tok3 = tok("tokenizer_3") if t5 is not None and present("tokenizer_3") else None
    if t5 is not None and tok3 is None:
        raise FileNotFoundError(f"{folder}: text_encoder_3 (T5) is present but tokenizer_3 is not")
    text = SD3TextEncoders(
        load_component(folder / "text_encoder", "clip", dtype),
        load_component(folder / "text_encoder_2", "clip", dtype),
        t5,
        tok("tokenizer"),
        tok("tokenizer_2"),
        tok3,
        transformer.config.joint_attention_dim,
    )
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    if sched.get("use_dynamic_shifting"):
        raise ValueError(
            f"{folder}: dynamic shifting is not supported by load_pipeline yet (SD3/SD3.5 use a "
            "fixed shift)"
        )
    vae = load_component(folder / "vae", "vae", dtype)
    size = transformer.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return Pipeline(
        transformer=transformer,
        text_encoder=text,
        codec=VAECodec(vae),
        shift=float(sched.get("shift", 1.0)),
        model_id=f"sd3:{folder.resolve().name}",
        default_size=(size, size),
    )


def load_pipeline(
    folder: str | os.PathLike | None = None, *, dtype=jnp.float32, mesh: Any = None
) -> Pipeline:
    """Load the embedded default model (``None``) or a local diffusers SD3 pipeline folder.

    ``mesh``: a :func:`rfmpc.sharding.make_mesh` mesh: the weights are placed on it (large ones
    split over ``"fsdp"``, see :meth:`Pipeline.shard`) and calls split the batch
    over ``"data"``. None (default): one device.
    """
    if mesh is not None:
        return load_pipeline(folder, dtype=dtype).shard(mesh)
    if folder is None:
        if not (EMBEDDED_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded model is missing from {EMBEDDED_DIR}; reinstall rfmpc or train it "
                "with `python -m rfmpc.train` and export it"
            )
        return _load_embedded(EMBEDDED_DIR, dtype)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no such model folder; pass a local diffusers StableDiffusion3Pipeline "
            "folder, or None for the embedded model"
        )
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name", "")
    if cls == "RfmpcEmbedded":
        return _load_embedded(folder, dtype)
    if cls != "StableDiffusion3Pipeline":
        raise ValueError(
            f"{folder}/model_index.json describes a {cls!r}; rfmpc loads StableDiffusion3Pipeline "
            "folders (SD3 / SD3.5) and its own embedded model"
        )
    return _load_sd3(folder, index, dtype)
