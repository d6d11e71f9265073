"""Transforms: the structures (coupling, autoregressive, continuous), coupling functions
and glue layers. Every one maps the base z to the data x (Pyro's convention).

Example:
    >>> from pyro_nf.transforms import Coupling, half_mask
    >>> layer = Coupling(half_mask(4), "affine", hidden_dims=(16,))
    >>> z = torch.randn(5, 4)
    >>> x = layer(z)                       # z -> x, one pass
    >>> torch.allclose(layer.inv(x), z)    # x -> z, from the cache of the last pair
    True
"""

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
