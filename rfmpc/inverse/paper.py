"""The baselines at their papers' per-task settings on the PnP-Flow image tasks.

:func:`paper_solver` returns a configured solver for a method of :data:`PAPER_METHODS` and a task
of :data:`rfmpc.inverse.PNP_FLOW_TASKS`, with a JSON-ready record of the setting and its source.
The published numbers come from PnP-Flow's CelebA benchmark (Martin et al., ICLR 2025), which
runs PnP-Flow and D-Flow on exactly these tasks (its repository's ``scripts/script_test.sh`` and
``config/method_config/*.yaml``):

PnP-Flow
    ``N = 100`` steps, ``lr = 1.0``, step schedule ``gamma_k = lr (1 - t_k)^alpha``
    (``alpha_1_minus_t``), ``num_samples`` (``n_avg``) 5 denoiser draws per step, ``alpha`` per
    task: denoise 0.8, deblur 0.01, SR 0.3, box inpainting 0.5, random inpainting 0.01.
    PnP-Flow's gradient is ``A^T (A x - y) / s^2`` with the learning rate multiplied by ``s^2``,
    i.e. a step ``gamma_k A^T (A x - y)``, which is :class:`PnPFlow`'s step. Its code starts
    from ``A^T 1``; the first interpolation (``t = 0``) replaces the iterate by pure noise, so
    the start point does not matter.
D-Flow
    Blended initialisation ``z0 = sqrt(0.1) ODE^{-1}(A^T y) + sqrt(0.9) eps``, the sampler a
    5-step midpoint rule (``steps_euler`` 6, i.e. 10 model calls a solve), torch L-BFGS with
    ``history_size`` 100 and a strong-Wolfe line search, ``LBFGS_iter`` 20 iterations per outer
    step and ``max_iter`` outer steps per task: denoise 3, deblur 7, SR 10, box 9, random 20;
    loss ``||A x - y||^2 + lmbda R(z)``, ``lmbda = 0.001``. Mapped to :class:`DFlow`:
    ``lam = 2 s^2`` (so ``lam Phi = ||A x - y||^2``), ``reg = 0.001``, ``20 * max_iter`` optax
    L-BFGS iterations (memory 100, zoom line search <= 25 evaluations). Differences: torch's
    L-BFGS also stops an outer step after 25 evaluations (here every iteration runs; the
    evaluations spent are counted), the inversion uses the same midpoint grid backwards instead
    of dopri5, and ``R`` is the chi-square negative log-density of the D-Flow paper (PnP-Flow's
    code adds the *log*-density with a plus sign; at weight 0.001 the term is small either way).
FlowChef, FlowGrad, OC-Flow
    No published setting exists for these tasks (FlowGrad's paper edits with a CLIP loss,
    OC-Flow's and FlowChef's image experiments use other operators and models); they run at
    this project's defaults (:data:`rfmpc.inverse.METHODS`), which the record says.
"""

from __future__ import annotations

from rfmpc.inverse._common import AbstractInverseSolver, InnerSolver
from rfmpc.inverse.baselines import DFlow, PnPFlow
from rfmpc.inverse.operators import PNP_FLOW_TASKS
from rfmpc.inverse.registry import make_solver

__all__ = ["DFLOW_OUTER_ITERS", "PAPER_METHODS", "PNP_FLOW_ALPHA", "paper_solver"]

#: PnP-Flow's step-size exponent ``alpha`` per task (CelebA, ``scripts/script_test.sh``).
PNP_FLOW_ALPHA = {
    "denoise": 0.8,
    "deblur": 0.01,
    "sr2": 0.3,
    "inpaint-box": 0.5,
    "inpaint-random": 0.01,
}
#: D-Flow's outer L-BFGS steps (``max_iter``) per task in PnP-Flow's benchmark.
DFLOW_OUTER_ITERS = {
    "denoise": 3,
    "deblur": 7,
    "sr2": 10,
    "inpaint-box": 9,
    "inpaint-random": 20,
}
#: Baselines :func:`paper_solver` configures.
PAPER_METHODS = ("pnp-flow", "d-flow", "flowchef", "flowgrad", "oc-flow")
_SRC = "PnP-Flow (Martin et al., ICLR 2025) CelebA benchmark, scripts/script_test.sh"


def paper_solver(method: str, task: str, noise_std: float) -> tuple[AbstractInverseSolver, dict]:
    """``(solver, setting)``: ``method`` at its published setting for ``task`` (module docstring).

    ``noise_std`` is the task's measurement noise (model units); D-Flow's data weight depends
    on it. ``setting`` is JSON-ready: the hyper-parameters, ``source`` and ``published`` (False
    where no published setting exists and the project's default is used).
    """
    if method not in PAPER_METHODS:
        raise ValueError(f"unknown baseline {method!r}; choose one of {list(PAPER_METHODS)}")
    if task not in PNP_FLOW_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(PNP_FLOW_TASKS)}")
    if not noise_std > 0:
        raise ValueError(f"noise_std must be > 0, got {noise_std}")
    if method == "pnp-flow":
        cfg = {"num_steps": 100, "lr": 1.0, "alpha": PNP_FLOW_ALPHA[task], "n_avg": 5}
        return PnPFlow(**cfg), {**cfg, "published": True, "source": _SRC}
    if method == "d-flow":
        outer = DFLOW_OUTER_ITERS[task]
        inner = InnerSolver("lbfgs", 20 * outer, 1.0, memory=100, linesearch_steps=25)
        solver = DFlow(
            num_steps=5,
            integrator="midpoint",
            inner=inner,
            lam=2.0 * float(noise_std) ** 2,
            reg=0.001,
            blend=0.1,
        )
        rec = {
            "num_steps": 5,
            "integrator": "midpoint",
            "lbfgs_iters": 20 * outer,
            "outer_steps": outer,
            "lam": 2.0 * float(noise_std) ** 2,
            "reg": 0.001,
            "blend": 0.1,
            "published": True,
            "source": _SRC + " and config/method_config/d_flow.yaml",
        }
        return solver, rec
    solver = make_solver(method)
    return solver, {
        "published": False,
        "source": "rfmpc default (no published setting for these tasks)",
    }
