"""Method names of the CLI/benchmark and their default configurations."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rfmpc.inverse._common import AbstractInverseSolver
from rfmpc.inverse.baselines import DFlow, FlowChef, FlowGrad, OCFlow, PnPFlow
from rfmpc.inverse.mpc_flow import mpc_dt, mpc_k1, mpc_rhc

__all__ = ["METHODS", "make_solver"]

#: name -> factory of the default-configured solver (keyword overrides are passed through).
METHODS: dict[str, Callable[..., AbstractInverseSolver]] = {
    "mpc-rhc": mpc_rhc,
    "mpc-dt": mpc_dt,
    "mpc-k1": mpc_k1,
    "pnp-flow": PnPFlow,
    "d-flow": DFlow,
    "flowgrad": FlowGrad,
    "oc-flow": OCFlow,
    "flowchef": FlowChef,
}


def make_solver(name: str, **overrides) -> AbstractInverseSolver:
    """The solver called ``name`` (see :data:`METHODS`), with hyper-parameter overrides."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    try:
        return METHODS[name](**overrides)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        cls = type(METHODS[name]())
        valid = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(overrides) - set(valid))
        raise TypeError(
            f"unknown option(s) {unknown} for method {name!r}; valid options: {valid}"
        ) from None
