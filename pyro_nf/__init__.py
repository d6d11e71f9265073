"""pyro_nf: normalizing flows for Pyro.

Every transform maps the base variable z to the data x (Pyro's convention) and is a
``pyro.distributions.TransformModule``; builders return a :class:`Flow` module that
owns its base distribution and gives a Pyro distribution when called.
"""

from pyro_nf import datasets, nn, transforms
from pyro_nf.flows import Flow, realnvp
from pyro_nf.transforms import (
    ActNorm,
    Additive,
    Affine,
    Coupling,
    FlowTransform,
    LULinear,
    Permutation,
    RationalQuadraticSpline,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "Additive",
    "Affine",
    "Coupling",
    "Flow",
    "FlowTransform",
    "LULinear",
    "Permutation",
    "RationalQuadraticSpline",
    "datasets",
    "nn",
    "realnvp",
    "transforms",
]
