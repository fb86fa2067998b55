"""MPC-Flow inverse problems: forward operators, MPC-Flow, the baselines and the metrics.

Restore ``x`` from ``y = A(x) + n`` with a pretrained flow model as the prior, training-free:
``solver(field, operator, y, noise_std, key) -> RestoreResult`` for every solver (MPC-Flow's
receding-horizon, K = 1 and Δt variants; PnP-Flow, D-Flow, FlowGrad, OC-Flow, FlowChef).
"""

from rfmpc.inverse._common import (
    AbstractInverseSolver,
    CompiledSolve,
    InnerSolver,
    InverseProblem,
    RestoreResult,
    euler_rollout,
    minimize,
)
from rfmpc.inverse.baselines import DFlow, FlowChef, FlowGrad, OCFlow, PnPFlow
from rfmpc.inverse.metrics import (
    bootstrap_ci,
    forward_equivalents,
    peak_memory,
    psnr,
    ssim,
    ssim_skimage,
    timed,
    to_unit,
)
from rfmpc.inverse.mpc_flow import MPCFlow, mpc_dt, mpc_k1, mpc_rhc
from rfmpc.inverse.operators import (
    PNP_FLOW_TASKS,
    TASKS,
    AbstractOperator,
    AveragePool,
    Decimation,
    GaussianBlur,
    Identity,
    Inpainting,
    MatrixOperator,
    SaturatedBlur,
    TaskPreset,
    add_noise,
    box_inpainting,
    make_operator,
    random_inpainting,
    task_preset,
)
from rfmpc.inverse.paper import PAPER_METHODS, paper_solver
from rfmpc.inverse.priors import IsotropicMixtureField
from rfmpc.inverse.registry import METHODS, make_solver

__all__ = [
    "METHODS",
    "PAPER_METHODS",
    "PNP_FLOW_TASKS",
    "TASKS",
    "AbstractInverseSolver",
    "AbstractOperator",
    "AveragePool",
    "CompiledSolve",
    "DFlow",
    "Decimation",
    "FlowChef",
    "FlowGrad",
    "GaussianBlur",
    "Identity",
    "InnerSolver",
    "Inpainting",
    "InverseProblem",
    "IsotropicMixtureField",
    "MPCFlow",
    "MatrixOperator",
    "OCFlow",
    "PnPFlow",
    "RestoreResult",
    "SaturatedBlur",
    "TaskPreset",
    "add_noise",
    "bootstrap_ci",
    "box_inpainting",
    "euler_rollout",
    "forward_equivalents",
    "make_operator",
    "make_solver",
    "minimize",
    "mpc_dt",
    "mpc_k1",
    "mpc_rhc",
    "paper_solver",
    "peak_memory",
    "psnr",
    "random_inpainting",
    "ssim",
    "ssim_skimage",
    "task_preset",
    "timed",
    "to_unit",
]
