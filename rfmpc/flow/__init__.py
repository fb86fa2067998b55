"""The flow engine: FlowMatch schedule, velocity fields, the controlled ODE and resumable states;
the lower layer the controllers and inverse solvers share (the optimisation loop, outcomes)."""

from rfmpc.flow.fields import (
    ClassifierFreeGuidance,
    ConditionalGaussianMixture,
    GaussianMixture,
    VelocityField,
    check_field,
    classifier_free_guidance,
)
from rfmpc.flow.optimise import OptimiseState, make_optimiser, minimise
from rfmpc.flow.results import OUTCOMES, RESULTS
from rfmpc.flow.schedule import (
    flowmatch_sigmas,
    shift_sigmas,
    timesteps_from_sigmas,
    validate_sigmas,
)
from rfmpc.flow.solve import (
    PiecewiseConstantControl,
    euler_reference,
    integrate,
    integrate_grid,
    integrate_path,
)
from rfmpc.flow.state import StateFileError, TrajectoryState, init_state

__all__ = [
    "OUTCOMES",
    "RESULTS",
    "ClassifierFreeGuidance",
    "ConditionalGaussianMixture",
    "GaussianMixture",
    "OptimiseState",
    "PiecewiseConstantControl",
    "StateFileError",
    "TrajectoryState",
    "VelocityField",
    "check_field",
    "classifier_free_guidance",
    "euler_reference",
    "flowmatch_sigmas",
    "init_state",
    "integrate",
    "integrate_grid",
    "integrate_path",
    "make_optimiser",
    "minimise",
    "shift_sigmas",
    "timesteps_from_sigmas",
    "validate_sigmas",
]
