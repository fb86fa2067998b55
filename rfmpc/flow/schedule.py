"""The FlowMatch Euler sigma grid, exactly as diffusers' ``FlowMatchEulerDiscreteScheduler``.

Convention: sigma runs from 1 (pure noise) to 0 (data); the network's ``timestep`` is
``sigma * 1000``. The grid has ``N + 1`` entries: ``N`` shifted sigmas and a final 0.

diffusers computes the grid in two stages, and we reproduce both bit for bit:

1. At construction, 1000 training sigmas ``t / 1000`` (``t = 1000 .. 1``, float32) are shifted,
   ``s * sigma / (1 + (s - 1) * sigma)``; ``sigma_min`` is the last one (so it is already shifted).
2. ``set_timesteps(N)`` spaces N points linearly (float64) from ``sigma_max * 1000`` to
   ``sigma_min * 1000``, divides by 1000 and shifts *again* (hence the endpoint is shifted twice),
   casts to float32 and appends 0.

With ``use_dynamic_shifting`` (Flux-style) the second shift is the exponential time shift
``exp(mu) / (exp(mu) + (1 / sigma - 1))`` instead.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["flowmatch_sigmas", "shift_sigmas", "timesteps_from_sigmas", "validate_sigmas"]


def shift_sigmas(sigmas, shift: float):
    """The SD3 resolution shift ``s * sigma / (1 + (s - 1) * sigma)`` (dtype preserved)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _training_sigma_range(shift: float, num_train_timesteps: int, dynamic: bool):
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    sig = t / np.float32(num_train_timesteps)
    if not dynamic:
        sig = shift_sigmas(sig, shift).astype(np.float32)
    return float(sig[0]), float(sig[-1])


def flowmatch_sigmas(
    num_steps: int,
    shift: float = 3.0,
    *,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
) -> Float[Array, " n_plus_1"]:
    """The ``num_steps + 1`` sigmas diffusers' FlowMatch Euler scheduler uses (final entry 0).

    Args:
        num_steps: number of inference steps N (>= 1).
        shift: the scheduler's ``shift`` (SD3: 3.0). Ignored when ``mu`` is given.
        num_train_timesteps: the scheduler's ``num_train_timesteps`` (1000 for SD3).
        mu: if given, use dynamic (exponential) shifting with this ``mu`` instead of ``shift``.

    Returns:
        float32 array of shape ``(num_steps + 1,)``, strictly decreasing, in [0, 1], ending in 0.
        Bit-identical to diffusers' ``scheduler.sigmas`` except where diffusers' float32
        rounding puts the first entry above 1 (shifts below ~0.5): that entry is clipped to 1.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if mu is None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift}")
    if mu is not None and not (isinstance(mu, (int, float, np.number)) and math.isfinite(mu)):
        raise ValueError(
            f"mu must be a finite number (dynamic shifting), got {mu!r}; pass mu=None to use shift"
        )
    dynamic = mu is not None
    sigma_max, sigma_min = _training_sigma_range(shift, num_train_timesteps, dynamic)
    ts = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sig = ts / num_train_timesteps
    if dynamic:
        sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1) ** 1.0)
    else:
        sig = shift_sigmas(sig, shift)
    sig = np.concatenate([sig.astype(np.float32), np.zeros(1, np.float32)])
    # diffusers' shift of sigma = 1, s / (1 + (s - 1)), rounds above 1 for small shifts (0.443:
    # 1.0000002, 0.054: 1.0000066); a noise level above 1 is off the model's domain, so the grid
    # is clipped to [0, 1] -- the only place it departs from diffusers (by < 1e-5)
    return jnp.asarray(np.minimum(sig, np.float32(1.0)))


def timesteps_from_sigmas(sigmas: Float[Array, " n_plus_1"]) -> Float[Array, " n"]:
    """The network's timestep argument for each step: ``sigmas[:-1] * 1000`` (float32)."""
    return jnp.asarray(sigmas[:-1], jnp.float32) * jnp.float32(1000.0)


def validate_sigmas(sigmas, name: str = "sigmas") -> np.ndarray:
    """Check a sigma grid is 1-D, finite and strictly decreasing; return it as numpy.

    Raises ValueError naming the first offending index, since a non-decreasing grid would make
    the Euler path run backwards in noise level.
    """
    s = np.asarray(sigmas)
    if s.ndim != 1 or s.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D grid with at least 2 entries, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} contains NaN or inf: {s}")
    d = np.diff(s)
    if np.any(d >= 0):
        i = int(np.argmax(d >= 0))
        raise ValueError(
            f"{name} must be strictly decreasing (noise -> data), but {name}[{i}]={s[i]} and "
            f"{name}[{i + 1}]={s[i + 1]}; build the grid with flowmatch_sigmas(num_steps, shift)"
        )
    return s
