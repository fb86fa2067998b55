"""Training-free flow-prior baselines on the same operators, noise model and prior as MPC-Flow.

Each baseline implements the core algorithm of its paper at small scale, in our sigma convention
(1 = noise, 0 = data; the papers' ``t`` is ``1 - sigma``), with its hyper-parameters stated in
its docstring. All use the data fit ``Phi(x) = ||A(x) - y||^2 / (2 s^2)`` except PnP-Flow and
FlowChef, which take plain gradient steps on ``F(x) = ||A(x) - y||^2 / 2`` as their papers do.

* :class:`PnPFlow` — Martin, Gagneux, Delon, Hurault et al., "PnP-Flow: Plug-and-play image
  restoration with flow matching", ICLR 2025 (arXiv:2410.02423).
* :class:`DFlow` — Ben-Hamu, Puny, Gat, Karrer, Singer, Lipman, "D-Flow: Differentiating through
  flows for controlled generation", ICML 2024 (arXiv:2402.14017).
* :class:`FlowGrad` — Liu, Wu, Liu, Liu, "FlowGrad: Controlling the output of generative ODEs
  with gradients", CVPR 2023.
* :class:`OCFlow` — Wang, Cheng, Liao, Qu, Liu, "Training free guided flow matching with optimal
  control", ICLR 2025 (arXiv:2410.18070).
* :class:`FlowChef` — Patel, Wen, Yang, "Steering rectified flow models in the vector field for
  controlled image generation", arXiv:2412.00100 (2024).
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rfmpc.flow.schedule import flowmatch_sigmas
from rfmpc.flow.solve import integrate_grid
from rfmpc.inverse._common import (
    AbstractInverseSolver,
    InnerSolver,
    InverseProblem,
    RestoreResult,
    _bcast,
    _NoCond,
    _per_image_sum,
    euler_rollout,
    minimize_counted,
    result,
)

__all__ = ["DFlow", "FlowChef", "FlowGrad", "OCFlow", "PnPFlow", "midpoint_rollout"]


def _fidelity_grad(problem: InverseProblem):
    """``x -> grad_x sum_b ||A(decode(x_b)) - y_b||^2 / 2`` (no model call)."""
    return jax.grad(lambda x: jnp.sum(problem.sq_residual(x)))


def _adjoint_init(problem: InverseProblem, shape):
    """``A^T y`` when it is an image of the state's shape, else None."""
    op = problem.operator
    if problem.decode is not None or not op.is_linear:
        return None
    xb = op.adjoint(problem.y)
    return xb if xb.shape == tuple(shape) else None


class PnPFlow(AbstractInverseSolver):
    """PnP-Flow (Martin et al., ICLR 2025): forward-backward splitting with a flow denoiser.

    For ``k = 0 .. N-1`` with ``sigma_k = 1 - k / N``::

        x <- x - gamma_k grad F(x),          gamma_k = lr * sigma_k ** alpha
        z  = (1 - sigma_k) x + sigma_k eps_k  (fresh noise: the interpolation step)
        x <- mean over n_avg draws of D(z, sigma_k) = z - sigma_k v(z, sigma_k)

    ``D`` is the flow's x0 prediction. Initialised at ``A^T y`` when it is an image (else 0).
    Hyper-parameters: ``num_steps`` N = 50, ``lr`` = 1.0, ``alpha`` = 0.5, ``n_avg`` = 1.
    NFE ``N * n_avg``, no backprop.
    """

    num_steps: int = eqx.field(static=True, default=50)
    lr: float = eqx.field(static=True, default=1.0)
    alpha: float = eqx.field(static=True, default=0.5)
    n_avg: int = eqx.field(static=True, default=1)

    def _solve(self, problem, key, shape) -> RestoreResult:
        n = self.num_steps
        x = _adjoint_init(problem, shape)
        x = jnp.zeros(shape, problem.y.dtype) if x is None else x
        grad_f = _fidelity_grad(problem)
        sigmas = 1.0 - jnp.arange(n, dtype=x.dtype) / n

        def step(x, inp):
            s, k = inp
            x = x - self.lr * s**self.alpha * grad_f(x)
            eps = jax.random.normal(k, (self.n_avg, *x.shape), x.dtype)
            z = (1.0 - s) * x[None] + s * eps
            den = jax.vmap(lambda zz: zz - s * problem.velocity(zz, s))(z)
            return den.mean(0), None

        keys = jax.random.split(key, n)
        x, _ = jax.lax.scan(step, x, (sigmas, keys))
        return result(problem, x, n * self.n_avg, 0)


class DFlow(AbstractInverseSolver):
    """D-Flow (Ben-Hamu et al., ICML 2024): optimise the source noise through the whole solve.

    ``min_z lam * Phi(ODE(z)) + reg * R(z)`` with ``ODE`` the N-step sampler (gradients through
    every step, each step checkpointed) and ``R(z) = ||z||^2 / 2 - (d/2 - 1) log ||z||^2``
    the negative log-density of ``||z||^2 ~ chi^2_d`` (keeps ``z`` on the Gaussian shell).
    ``integrator``: ``"euler"`` (N model calls a solve) or ``"midpoint"`` (2N; the D-Flow paper
    and PnP-Flow's re-implementation solve with the midpoint rule,
    ``x + h v(x + h/2 v(x, s), s + h/2)``).
    Initialisation as in the paper: ``z0 = sqrt(blend) * ODE^{-1}(A^T y) + sqrt(1 - blend) eps``
    (the backward solve of the adjoint image on the reversed grid with the same integrator, when
    ``A^T y`` is an image; else ``z0 = eps``). PnP-Flow inverts with adaptive dopri5 (tol 1e-5)
    instead; here the inversion costs one more solve.
    The default ``blend`` is 0 (``z0 = eps``): on our analytic mixture priors the inverted ODE of
    an off-prior ``A^T y`` lands far from the Gaussian shell and the optimisation stalls there.
    :func:`rfmpc.inverse.paper_solver` gives the published per-task setting (blend 0.1).
    Hyper-parameters: ``num_steps`` N = 10, L-BFGS 10 iterations (line search <= 10),
    ``lam`` = 1, ``reg`` = 1, ``blend`` = 0, ``integrator`` = ``"euler"``.
    """

    num_steps: int = eqx.field(static=True, default=10)
    inner: InnerSolver = InnerSolver("lbfgs", 10, 1.0)
    lam: float = eqx.field(static=True, default=1.0)
    reg: float = eqx.field(static=True, default=1.0)
    blend: float = eqx.field(static=True, default=0.0)
    shift: float = eqx.field(static=True, default=1.0)
    checkpoint: bool = eqx.field(static=True, default=True)
    integrator: str = eqx.field(static=True, default="euler")

    def __check_init__(self):
        if self.integrator not in ("euler", "midpoint"):
            raise ValueError(f"integrator must be 'euler' or 'midpoint', got {self.integrator!r}")
        if not 0.0 <= self.blend < 1.0:
            raise ValueError(f"blend must be in [0, 1), got {self.blend}")

    def _calls_per_solve(self) -> int:
        return self.num_steps * (2 if self.integrator == "midpoint" else 1)

    def _rollout(self, problem, z, sig, checkpoint):
        if self.integrator == "euler":
            return euler_rollout(problem.velocity, z, sig, checkpoint=checkpoint)
        return midpoint_rollout(problem.velocity, z, sig, checkpoint=checkpoint)

    def _solve(self, problem, key, shape) -> RestoreResult:
        sig = flowmatch_sigmas(self.num_steps, self.shift).astype(problem.y.dtype)
        eps = jax.random.normal(key, shape, problem.y.dtype)
        n = self._calls_per_solve()
        nfe = 0
        xb = _adjoint_init(problem, shape)
        if xb is not None and self.blend > 0:
            zb = self._rollout(problem, xb, sig[::-1], checkpoint=False)
            z0 = jnp.sqrt(self.blend) * zb + jnp.sqrt(1.0 - self.blend) * eps
            nfe += n
        else:
            z0 = eps
        d = z0[0].size

        def solve(z):
            return self._rollout(problem, z, sig, checkpoint=self.checkpoint)

        def loss(z):
            r2 = _per_image_sum(z**2)
            chi = 0.5 * r2 - (0.5 * d - 1.0) * jnp.log(r2)
            return self.lam * jnp.sum(problem.phi(solve(z))) + self.reg * jnp.sum(chi)

        z, evals, _, _, res = minimize_counted(loss, z0, self.inner)
        x = solve(z)
        return result(problem, x, nfe + evals * n + n, evals * n, outcome=res)


def midpoint_rollout(
    velocity,
    x: Float[Array, "b ..."],
    sigmas: Float[Array, " k_plus_1"],
    *,
    checkpoint: bool = True,
) -> Float[Array, "b ..."]:
    """Midpoint-rule steps ``x <- x + h v(x + (h/2) v(x, s), s + h/2)``, ``h = s' - s``, over
    ``sigmas``: the flow core's solve with ``diffrax.Midpoint()`` (2 model calls a step; each step
    rematerialised once in the backward pass when ``checkpoint``, see
    :func:`rfmpc.flow.integrate_grid`)."""
    return integrate_grid(
        _NoCond(velocity), x, sigmas, checkpoint=checkpoint, solver=diffrax.Midpoint()
    )


def _controlled_grid(num_steps, shift, dtype):
    sig = flowmatch_sigmas(num_steps, shift).astype(dtype)
    return sig, sig[:-1] - sig[1:]  # grid and positive step lengths


class FlowGrad(AbstractInverseSolver):
    """FlowGrad (Liu et al., CVPR 2023): gradient descent on per-step controls through the solve.

    Controls ``u_k`` are added to the velocity on each of the N Euler steps from a fixed noise;
    the loss ``control_weight * sum_k ||u_k||^2 dsigma_k + lam * Phi(x_N)`` is minimised with a
    first-order optimiser, gradients by backpropagation through the whole (checkpointed)
    trajectory. (The paper's non-uniform-discretisation speed-up is not implemented.)
    Hyper-parameters: ``num_steps`` N = 20, Adam 20 iterations, lr 0.05 on the per-step
    displacements ``dsigma_k u_k`` (image units), ``control_weight`` = 1, ``lam`` = 1.
    """

    num_steps: int = eqx.field(static=True, default=20)
    inner: InnerSolver = InnerSolver("adam", 20, 0.05)
    lam: float = eqx.field(static=True, default=1.0)
    control_weight: float = eqx.field(static=True, default=1.0)
    shift: float = eqx.field(static=True, default=1.0)
    checkpoint: bool = eqx.field(static=True, default=True)

    def _solve(self, problem, key, shape) -> RestoreResult:
        x1 = jax.random.normal(key, shape, problem.y.dtype)
        sig, ds = _controlled_grid(self.num_steps, self.shift, x1.dtype)
        n = self.num_steps

        def controls(w):
            return w / _bcast(ds, w)

        def loss(w):
            u = controls(w)
            xn = euler_rollout(problem.velocity, x1, sig, u, checkpoint=self.checkpoint)
            energy = jnp.sum(u**2 * _bcast(ds, u))
            return self.control_weight * energy + self.lam * jnp.sum(problem.phi(xn))

        w, evals, _, _, res = minimize_counted(loss, jnp.zeros((n, *shape), x1.dtype), self.inner)
        u = controls(w)
        x = euler_rollout(problem.velocity, x1, sig, u, checkpoint=False)
        energy = _per_image_sum(jnp.moveaxis(u**2 * _bcast(ds, u), 0, -1))
        return result(problem, x, evals * n + n, evals * n, outcome=res, control_energy=energy)


class OCFlow(AbstractInverseSolver):
    """OC-Flow (Wang et al., ICLR 2025): optimal-control guidance by successive approximations.

    Same cost as MPC-Flow's global problem, ``sum_k ||u_k||^2 dsigma_k + lam * Phi(x_N)``, solved
    on the whole N-step trajectory by the (damped) method of successive approximations: a forward
    pass with the current controls, the co-states ``p_{k+1} = d(lam Phi)/dx_{k+1}`` by a backward
    pass (vector-Jacobian products through every step), then each control moves towards the
    Hamiltonian minimiser ``argmin_u ||u||^2 dsigma_k - dsigma_k p_{k+1} . u = p_{k+1} / 2``::

        u_k <- (1 - eta') u_k + eta' * p_{k+1} / 2,   eta' = eta / (1 + lam / (2 s^2)).

    The fixed-point iteration is stable only for a damping small against the curvature of
    ``lam Phi`` (``lam ||A||^2 / s^2``); ``eta'`` normalises it by that bound for operators with
    ``||A|| <= 1`` (all of :mod:`rfmpc.inverse.operators` but the saturated blur, ``~2``), so
    ``eta`` is scale-free. Hyper-parameters: ``num_steps`` N = 20, ``iters`` = 20,
    ``eta`` = 0.5, ``lam`` = 1.
    """

    num_steps: int = eqx.field(static=True, default=20)
    iters: int = eqx.field(static=True, default=20)
    eta: float = eqx.field(static=True, default=0.5)
    lam: float = eqx.field(static=True, default=1.0)
    shift: float = eqx.field(static=True, default=1.0)
    checkpoint: bool = eqx.field(static=True, default=True)

    def _solve(self, problem, key, shape) -> RestoreResult:
        x1 = jax.random.normal(key, shape, problem.y.dtype)
        sig, ds = _controlled_grid(self.num_steps, self.shift, x1.dtype)
        n = self.num_steps

        def terminal(u):
            xn = euler_rollout(problem.velocity, x1, sig, u, checkpoint=self.checkpoint)
            return self.lam * jnp.sum(problem.phi(xn))

        eta = self.eta / (1.0 + self.lam / (2.0 * problem.noise_std**2))

        def body(_, u):
            g = jax.grad(terminal)(u)  # g_k = -dsigma_k p_{k+1}
            p_next = -g / _bcast(ds, g)
            return (1.0 - eta) * u + eta * 0.5 * p_next

        u = jax.lax.fori_loop(0, self.iters, body, jnp.zeros((n, *shape), x1.dtype))
        x = euler_rollout(problem.velocity, x1, sig, u, checkpoint=False)
        energy = _per_image_sum(jnp.moveaxis(u**2 * _bcast(ds, u), 0, -1))
        return result(problem, x, self.iters * n + n, self.iters * n, control_energy=energy)


class FlowChef(AbstractInverseSolver):
    """FlowChef (Patel et al., 2024): steer the state with gradients taken at its x0 prediction.

    At each of the N Euler steps: ``v = v(x, sigma)``, ``x0 = x - sigma v``; then ``inner_steps``
    times ``x <- x - step_size * grad F(x0)``, ``x0 <- x - sigma v`` (the gradient is taken with
    respect to the x0 prediction and applied to ``x`` as if ``dx0/dx = I``: no backprop through
    the model; ``v`` is held fixed), and finally the Euler step ``x <- x + (sigma' - sigma) v``.
    Hyper-parameters: ``num_steps`` N = 50, ``step_size`` = 1.0, ``inner_steps`` = 1.
    NFE N, no backprop.
    """

    num_steps: int = eqx.field(static=True, default=50)
    step_size: float = eqx.field(static=True, default=1.0)
    inner_steps: int = eqx.field(static=True, default=1)
    shift: float = eqx.field(static=True, default=1.0)

    def _solve(self, problem, key, shape) -> RestoreResult:
        x = jax.random.normal(key, shape, problem.y.dtype)
        sig = flowmatch_sigmas(self.num_steps, self.shift).astype(x.dtype)
        grad_f = _fidelity_grad(problem)

        def step(x, s):
            s_now, s_next = s
            v = problem.velocity(x, s_now)

            def inner(_, x):
                return x - self.step_size * grad_f(x - s_now * v)

            x = jax.lax.fori_loop(0, self.inner_steps, inner, x)
            return x + (s_next - s_now) * v, None

        x, _ = jax.lax.scan(step, x, (sig[:-1], sig[1:]))
        return result(problem, x, self.num_steps, 0)
