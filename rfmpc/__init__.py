"""rfmpc: inference-time control of pretrained rectified-flow models in JAX.

Conventions (see docs/architecture.md): sigma runs from 1 (noise) to 0 (data),
x_sigma = (1 - sigma) x_data + sigma noise, the model predicts v = noise - x_data, and
latents/images are NHWC.
"""

__version__ = "0.1.0"
