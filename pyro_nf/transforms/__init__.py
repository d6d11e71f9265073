"""Transforms: the structures (coupling, autoregressive, continuous), coupling functions
and glue layers."""

from pyro_nf.transforms.autoregressive import (
    Autoregressive,
    InverseAutoregressive,
    MaskedAutoregressive,
)
from pyro_nf.transforms.base import ConditionedTransform, FlowTransform, PairCache
from pyro_nf.transforms.continuous import (
    ContinuousFlow,
    collect_regularization,
    draw_probe,
    exact_trace,
    hutchinson_trace,
)
from pyro_nf.transforms.coupling import Coupling, half_mask
from pyro_nf.transforms.coupling_functions import (
    Additive,
    Affine,
    CouplingFunction,
    RationalQuadraticSpline,
    coupling_function,
)
from pyro_nf.transforms.glue import ActNorm, LULinear, Permutation

__all__ = [
    "ActNorm",
    "Additive",
    "Affine",
    "Autoregressive",
    "ConditionedTransform",
    "ContinuousFlow",
    "Coupling",
    "CouplingFunction",
    "FlowTransform",
    "InverseAutoregressive",
    "LULinear",
    "MaskedAutoregressive",
    "PairCache",
    "Permutation",
    "RationalQuadraticSpline",
    "collect_regularization",
    "coupling_function",
    "draw_probe",
    "exact_trace",
    "half_mask",
    "hutchinson_trace",
]
