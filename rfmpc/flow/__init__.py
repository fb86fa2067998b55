"""The flow engine: FlowMatch schedule, velocity fields, the controlled ODE and resumable states."""

from rfmpc.flow.fields import (
    ClassifierFreeGuidance,
    ConditionalGaussianMixture,
    GaussianMixture,
    VelocityField,
    classifier_free_guidance,
)
from rfmpc.flow.schedule import (
    flowmatch_sigmas,
    shift_sigmas,
    timesteps_from_sigmas,
    validate_sigmas,
)
from rfmpc.flow.solve import PiecewiseConstantControl, euler_reference, integrate, integrate_path
from rfmpc.flow.state import StateFileError, TrajectoryState, init_state

__all__ = [
    "ClassifierFreeGuidance",
    "ConditionalGaussianMixture",
    "GaussianMixture",
    "PiecewiseConstantControl",
    "StateFileError",
    "TrajectoryState",
    "VelocityField",
    "classifier_free_guidance",
    "euler_reference",
    "flowmatch_sigmas",
    "init_state",
    "integrate",
    "integrate_path",
    "shift_sigmas",
    "timesteps_from_sigmas",
    "validate_sigmas",
]
