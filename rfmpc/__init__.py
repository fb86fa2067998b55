"""rfmpc: inference-time control of pretrained rectified-flow models in JAX.

Conventions (see docs/architecture.md): sigma runs from 1 (noise) to 0 (data),
x_sigma = (1 - sigma) x_data + sigma noise, the model predicts v = noise - x_data, and
latents/images are NHWC.
"""

__version__ = "0.1.0"

__all__ = [
    "CachedGenerator",
    "Pipeline",
    "initialize_distributed",
    "load_pipeline",
    "make_mesh",
    "shard_batch",
    "shard_params",
]

_PARALLEL = ("initialize_distributed", "make_mesh", "shard_batch", "shard_params")


def __getattr__(name: str):
    # lazy: `import rfmpc` stays cheap; `rfmpc.load_pipeline` imports the pipeline on first use
    if name in ("load_pipeline", "Pipeline"):
        from rfmpc import pipeline

        return getattr(pipeline, name)
    if name == "CachedGenerator":  # serve prompts from a trajectory cache (rfmpc.cached)
        from rfmpc import cached

        return cached.CachedGenerator
    if name in _PARALLEL:  # multi-device helpers, model-free (docs/parallel.md)
        from rfmpc import sharding

        return getattr(sharding, name)
    raise AttributeError(f"module 'rfmpc' has no attribute {name!r}")
