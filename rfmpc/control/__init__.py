"""Prompt-switch controllers: finish prompt B from prompt A's cached trajectory state.

Controllers are immutable ``equinox`` modules whose options are their fields (the abstract/final
pattern: :class:`AbstractController` declares the methods, each final class implements them):

``Direct``, ``Blend``, ``Adaptive``   commands (blend schedules, no control)
``Reproject``, ``SDEdit``             a new start state, then the direct command
``Shooting``, ``MultipleShooting``    an exact-gradient plan over the first steps
``MPC``                               receding-horizon MPC (default: analytic linearisation,
                                      closed-form LQR; ``OSQP`` for coupled blocks)
``ShootingMPC``                       a shooting plan tracked by MPC, with re-plans

``switch(field, state_a, cond_b, controller)`` runs one; ``switch_batch`` runs the same over a
batch. Outcomes come back as :class:`RESULTS` items, costs as :class:`Cost`.
"""

from rfmpc.control.base import (
    AbstractCommand,
    AbstractController,
    PlanOut,
    Schedule,
    StepOut,
    SwitchProblem,
)
from rfmpc.control.blend import Adaptive, Blend
from rfmpc.control.direct import Direct
from rfmpc.control.linearisation import (
    AbstractLinearisation,
    Analytic,
    Frozen,
    JVPBlocks,
    jacobian_blocks,
    num_probes,
)
from rfmpc.control.lqr import LQR, AbstractQPSolver, LinearQP, kkt_residual, lqr_controls, qp_cost
from rfmpc.control.mpc import MPC, MPCState, mpc_qp
from rfmpc.control.qp import (
    OSQP,
    BlockQP,
    QPResult,
    block_cost,
    dense_qp,
    shift_warm_start,
    solve_block_qp,
)
from rfmpc.control.reproject import Reproject
from rfmpc.control.results import OUTCOMES, RESULTS, Cost
from rfmpc.control.schedules import (
    BlendedField,
    BlendSchedule,
    alpha_direct,
    alpha_linear,
    alpha_sigmoid,
    blend_nfe,
    blended_cond_field,
    velocity_similarity,
)
from rfmpc.control.sdedit import SDEdit
from rfmpc.control.shooting import (
    MultipleShooting,
    Shooting,
    ShootingPlan,
    implied_noise,
    noise_consistency_error,
    shooting_objective,
)
from rfmpc.control.shooting_mpc import ShootingMPC
from rfmpc.control.switch import (
    BatchSwitchResult,
    SwitchCache,
    SwitchResult,
    from_scratch_equal_nfe,
    stack_states,
    switch,
    switch_batch,
)

__all__ = [
    "LQR",
    "MPC",
    "OSQP",
    "OUTCOMES",
    "RESULTS",
    "AbstractCommand",
    "AbstractController",
    "AbstractLinearisation",
    "AbstractQPSolver",
    "Adaptive",
    "Analytic",
    "BatchSwitchResult",
    "Blend",
    "BlendSchedule",
    "BlendedField",
    "BlockQP",
    "Cost",
    "Direct",
    "Frozen",
    "JVPBlocks",
    "LinearQP",
    "MPCState",
    "MultipleShooting",
    "PlanOut",
    "QPResult",
    "Reproject",
    "SDEdit",
    "Schedule",
    "Shooting",
    "ShootingMPC",
    "ShootingPlan",
    "StepOut",
    "SwitchCache",
    "SwitchProblem",
    "SwitchResult",
    "alpha_direct",
    "alpha_linear",
    "alpha_sigmoid",
    "blend_nfe",
    "blended_cond_field",
    "block_cost",
    "dense_qp",
    "from_scratch_equal_nfe",
    "implied_noise",
    "jacobian_blocks",
    "kkt_residual",
    "lqr_controls",
    "mpc_qp",
    "noise_consistency_error",
    "num_probes",
    "qp_cost",
    "shift_warm_start",
    "shooting_objective",
    "solve_block_qp",
    "stack_states",
    "switch",
    "switch_batch",
    "velocity_similarity",
]
