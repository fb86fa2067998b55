"""Tiny models for tests (and for the benchmarks' plumbing/timing profiles).

:func:`tiny_mmdit_pipeline` is a randomly initialised 1-layer pixel-space MM-DiT in a real
:class:`rfmpc.pipeline.Pipeline`: a stand-in for plumbing, timing and memory checks; its
restorations mean nothing. It lives with the tests so that the library (``rfmpc.inverse`` in
particular) never builds models; ``benchmarks/_priors.py`` imports it from here.
"""

from __future__ import annotations

__all__ = ["tiny_mmdit_pipeline", "tiny_mmdit_prior"]


def tiny_mmdit_pipeline(resolution: int = 16, seed: int = 0):
    """A random 1-layer pixel-space MM-DiT (patch 4, width 32) at ``resolution`` x ``resolution``
    with a zero text encoder and no shift, in a real :class:`rfmpc.pipeline.Pipeline`."""
    import jax.numpy as jnp
    from flax import nnx

    from rfmpc.models.configs import MMDiTConfig
    from rfmpc.models.mmdit import MMDiT
    from rfmpc.models.transformer import Transformer
    from rfmpc.pipeline import Pipeline, PixelCodec

    cfg = MMDiTConfig(
        sample_size=resolution,
        patch_size=4,
        in_channels=3,
        out_channels=3,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=8,
        caption_projection_dim=32,
        pooled_projection_dim=8,
        pos_embed_max_size=resolution // 4,
    )
    transformer = Transformer.from_module(MMDiT(cfg, rngs=nnx.Rngs(seed)))

    def text_encoder(prompts, max_sequence_length=None):
        n = len(prompts)
        return {"embeds": jnp.zeros((n, 4, 8)), "pooled": jnp.zeros((n, 8))}

    return Pipeline(
        transformer=transformer,
        text_encoder=text_encoder,
        codec=PixelCodec(),
        shift=1.0,
        model_id="tiny-random-mmdit",
        default_size=(resolution, resolution),
    )


def tiny_mmdit_prior(resolution: int = 16, seed: int = 0):
    """:func:`tiny_mmdit_pipeline` adapted by :func:`rfmpc.restore.prior_from_pipeline`."""
    from rfmpc.restore import prior_from_pipeline

    return prior_from_pipeline(
        tiny_mmdit_pipeline(resolution, seed),
        name=f"tiny random MM-DiT ({resolution}x{resolution})",
    )
