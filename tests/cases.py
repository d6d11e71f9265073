"""The registry of transforms that run through the contract suite.

Adding a transform to the package means adding one entry here: a readable id and a
:class:`~pyro_nf.testing.TransformContract` with a factory of small instances.
"""

from __future__ import annotations

from pyro_nf.nn import ODEDynamics
from pyro_nf.testing import TransformContract
from pyro_nf.transforms import (
    ActNorm,
    ContinuousFlow,
    Coupling,
    InverseAutoregressive,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    RationalQuadraticSpline,
    half_mask,
)

DIM = 4
CONTEXT_DIM = 3
SMALL = (8, 8)


def _coupling(function, context_dim: int = 0, mask=None, **kwargs):
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


def _continuous(context_dim: int = 0, state_scale: bool = False, **kwargs):
    # float64 checks need tight solver tolerances; a tiny field in two dimensions keeps
    # each solve (and the D adjoint solves of an autograd Jacobian) fast.
    def factory():
        options = dict(kwargs)
        if state_scale:  # a field of the form s * z + m (ODEDynamics(state_scale=True))
            options["dynamics"] = ODEDynamics(CNF_DIM, (8,), context_dim, state_scale=True)
        return ContinuousFlow(
            CNF_DIM, hidden_dims=(8,), context_dim=context_dim, rtol=1e-10, atol=1e-10, **options
        )

    return factory


def _autoregressive(layer_class, function, context_dim: int = 0, dim: int = DIM, **kwargs):
    kwargs = {"hidden_dims": SMALL, "activation": "tanh", **kwargs}

    def factory():
        return layer_class(dim, function, context_dim=context_dim, **kwargs)

    return factory


def _autoregressive_cases() -> dict[str, TransformContract]:
    cases = {}
    for prefix, layer_class in (("maf", MaskedAutoregressive), ("iaf", InverseAutoregressive)):
        for function in ("affine", "additive", "spline"):
            cases[f"{prefix}-{function}"] = TransformContract(
                _autoregressive(layer_class, function), DIM
            )
        for function in ("affine", "spline"):
            cases[f"{prefix}-{function}-conditional"] = TransformContract(
                _autoregressive(layer_class, function, CONTEXT_DIM), DIM, CONTEXT_DIM
            )
        cases[f"{prefix}-affine-random-order"] = TransformContract(
            _autoregressive(layer_class, "affine", order="random", seed=3), DIM
        )
        cases[f"{prefix}-spline-random-order-conditional-residual"] = TransformContract(
            _autoregressive(
                layer_class, "spline", CONTEXT_DIM, order="random", seed=4, residual=True
            ),
            DIM,
            CONTEXT_DIM,
        )
        cases[f"{prefix}-affine-narrow-hidden"] = TransformContract(
            _autoregressive(layer_class, "affine", dim=6, hidden_dims=(3,)), 6
        )
        cases[f"{prefix}-affine-1d"] = TransformContract(
            _autoregressive(layer_class, "affine", dim=1), 1
        )
        cases[f"{prefix}-spline-1d-conditional"] = TransformContract(
            _autoregressive(layer_class, "spline", CONTEXT_DIM, dim=1), 1, CONTEXT_DIM
        )
    return cases


CNF_DIM = 2
# The solver's error (about 1e-9 here) bounds round trips and log-dets.
ODE_TOLERANCES = {"round_trip_tolerance": 1e-7, "log_det_tolerance": 1e-6}

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
    # The conditioners' final multiplier (the small guides' 1/8) in a guide's layers.
    "coupling-spline-final-multiplier": TransformContract(
        _coupling("spline", final_multiplier=0.125), DIM
    ),
    "iaf-spline-final-multiplier": TransformContract(
        _autoregressive(InverseAutoregressive, "spline", final_multiplier=0.125), DIM
    ),
    "coupling-affine-conditional": TransformContract(
        _coupling("affine", CONTEXT_DIM), DIM, CONTEXT_DIM
    ),
    "coupling-spline-conditional": TransformContract(
        _coupling("spline", CONTEXT_DIM), DIM, CONTEXT_DIM
    ),
    # A small bound puts about half of the test inputs (scale 1.5) in the tails.
    "coupling-spline-linear-tails-small-bound": TransformContract(
        _coupling(RationalQuadraticSpline(num_bins=5, bound=1.0, tails="linear")), DIM
    ),
    "coupling-spline-identity-tails-small-bound": TransformContract(
        _coupling(RationalQuadraticSpline(num_bins=5, bound=1.0, tails="identity")), DIM
    ),
    "maf-spline-linear-tails-small-bound": TransformContract(
        _autoregressive(
            MaskedAutoregressive, RationalQuadraticSpline(num_bins=5, bound=1.0, tails="linear")
        ),
        DIM,
    ),
    "permutation-random": TransformContract(lambda: Permutation.random(DIM, seed=3), DIM),
    "permutation-reverse": TransformContract(lambda: Permutation.reverse(DIM), DIM),
    "actnorm": TransformContract(lambda: ActNorm(DIM), DIM),
    "lu-linear": TransformContract(lambda: LULinear(DIM, permutation="random"), DIM),
    "cnf-exact": TransformContract(_continuous(), CNF_DIM, **ODE_TOLERANCES),
    "cnf-conditional": TransformContract(
        _continuous(CONTEXT_DIM), CNF_DIM, CONTEXT_DIM, **ODE_TOLERANCES
    ),
    "cnf-state-scale": TransformContract(_continuous(state_scale=True), CNF_DIM, **ODE_TOLERANCES),
    "cnf-learned-time-softplus": TransformContract(
        _continuous(learn_time=True, time=0.5, activation="softplus"), CNF_DIM, **ODE_TOLERANCES
    ),
    **_autoregressive_cases(),
}
