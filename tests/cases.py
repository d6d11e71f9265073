"""The registry of transforms that run through the contract suite.

Adding a transform to the package means adding one entry here: a readable id and a
:class:`~pyro_nf.testing.TransformContract` with a factory of small instances.
"""

from __future__ import annotations

from pyro_nf.testing import TransformContract
from pyro_nf.transforms import ActNorm, Coupling, LULinear, Permutation, half_mask

DIM = 4
CONTEXT_DIM = 3
SMALL = (8, 8)


def _coupling(function: str, context_dim: int = 0, mask=None, **kwargs):
    def factory():
        return Coupling(
            half_mask(DIM) if mask is None else mask,
            function,
            hidden_dims=SMALL,
            context_dim=context_dim,
            activation="tanh",
            **kwargs,
        )

    return factory


CASES: dict[str, TransformContract] = {
    "coupling-affine": TransformContract(_coupling("affine"), DIM),
    "coupling-additive": TransformContract(_coupling("additive"), DIM),
    "coupling-spline": TransformContract(_coupling("spline"), DIM),
    "coupling-affine-second-half": TransformContract(
        _coupling("affine", mask=half_mask(DIM, first_half=False)), DIM
    ),
    "coupling-spline-interleaved-mask": TransformContract(
        _coupling("spline", mask=[True, False, True, False]), DIM
    ),
    "coupling-affine-conditional": TransformContract(
        _coupling("affine", CONTEXT_DIM), DIM, CONTEXT_DIM
    ),
    "coupling-spline-conditional": TransformContract(
        _coupling("spline", CONTEXT_DIM), DIM, CONTEXT_DIM
    ),
    "permutation-random": TransformContract(lambda: Permutation.random(DIM, seed=3), DIM),
    "permutation-reverse": TransformContract(lambda: Permutation.reverse(DIM), DIM),
    "actnorm": TransformContract(lambda: ActNorm(DIM), DIM),
    "lu-linear": TransformContract(lambda: LULinear(DIM, permutation="random"), DIM),
}
