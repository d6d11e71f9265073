"""Transforms: the structures (coupling, autoregressive, continuous), coupling functions
and glue layers."""

from pyro_nf.transforms.base import ConditionedTransform, FlowTransform, PairCache
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
    "ConditionedTransform",
    "Coupling",
    "CouplingFunction",
    "FlowTransform",
    "LULinear",
    "PairCache",
    "Permutation",
    "RationalQuadraticSpline",
    "coupling_function",
    "half_mask",
]
