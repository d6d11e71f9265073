"""pyro_nf: normalizing flows for Pyro.

Every transform maps the base variable z to the data x (Pyro's convention) and is a
``pyro.distributions.TransformModule``; builders return a :class:`Flow` module that
owns its base distribution and gives a Pyro distribution when called.
"""

from pyro_nf import datasets, infer, nn, transforms
from pyro_nf.flows import Flow, cnf, iaf, maf, realnvp
from pyro_nf.infer import (
    AmortizedFlowGuide,
    AutoFlow,
    FitHistory,
    NonFiniteLossError,
    PSISResult,
    fit,
    psis_diagnostic,
    to_inference_data,
)
from pyro_nf.transforms import (
    ActNorm,
    Additive,
    Affine,
    ContinuousFlow,
    Coupling,
    FlowTransform,
    InverseAutoregressive,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    RationalQuadraticSpline,
)

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "Additive",
    "Affine",
    "AmortizedFlowGuide",
    "AutoFlow",
    "ContinuousFlow",
    "Coupling",
    "FitHistory",
    "Flow",
    "FlowTransform",
    "InverseAutoregressive",
    "LULinear",
    "MaskedAutoregressive",
    "NonFiniteLossError",
    "PSISResult",
    "Permutation",
    "RationalQuadraticSpline",
    "cnf",
    "datasets",
    "fit",
    "iaf",
    "infer",
    "maf",
    "nn",
    "psis_diagnostic",
    "realnvp",
    "to_inference_data",
    "transforms",
]
