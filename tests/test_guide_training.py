"""Training signal for flow guides: the path-derivative gradient, the Student-t base,
and ``fit_guide`` (pyro_nf.infer.guide_training)."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pyro.infer import Trace_ELBO

from pyro_nf.flows import realnvp
from pyro_nf.infer import (
    AutoFlow,
    NonFiniteLossError,
    annealed_inverse_temperature,
    fit_guide,
    guide_training,
    temper_likelihood,
)
from pyro_nf.infer.autoguide import (
    GUIDE_CNF_LARGE_BLOCKS,
    GUIDE_CNF_LARGE_INIT,
    GUIDE_CNF_LARGE_TOL,
    GUIDE_REALNVP_LARGE_LAYERS,
    GUIDE_REALNVP_LARGE_PERMUTATION,
    GUIDE_REALNVP_LU_MAX_DIM,
    GUIDE_REALNVP_NO_GLUE_LAYERS,
    GUIDE_SMALL_FINAL_MULTIPLIER,
    GUIDE_SMALL_MAX_DIM,
    PathDerivativeDistribution,
    guide_flow_defaults,
    guide_training_defaults,
    interleaved_coupling_functions,
    paired_coupling_functions,
)
from pyro_nf.infer.guide_training import MAX_REFUSED_UPDATES
from pyro_nf.infer.targets import twisted_gaussian
from pyro_nf.infer.training import optimization_step
from pyro_nf.transforms import ContinuousFlow

SMALL = {"num_layers": 2, "hidden_dims": (8,)}
# Explicit glue layers, so these tests do not change with the guide defaults.
GLUE = {"iaf": "reverse", "maf": "reverse", "realnvp": None}


def gaussian_model() -> None:
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def loss_and_gradients(model, guide, particles: int, seed: int) -> tuple[float, torch.Tensor]:
    """The vectorized ELBO loss and its gradient w.r.t. every guide parameter (flat)."""
    pyro.set_rng_seed(seed)
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    loss = elbo.differentiable_loss(model, guide)
    parameters = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    flat = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads, strict=True)]
    return float(loss), torch.cat([g.reshape(-1) for g in flat])


def make_guide(model, family: str, **options) -> AutoFlow:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(model, flow=family, permutation=GLUE[family], **SMALL, **options)
    guide()
    return guide


@pytest.mark.parametrize("family", ["iaf", "maf", "realnvp"])
@pytest.mark.parametrize("base", ["normal", "student_t"])
def test_path_gradient_has_the_same_elbo_value(family, base):
    model = twisted_gaussian().model
    guide = make_guide(model, family, base=base)
    guide._gradient = "total"
    total, _ = loss_and_gradients(model, guide, 64, seed=1)
    guide._gradient = "path"
    path, _ = loss_and_gradients(model, guide, 64, seed=1)
    # Same draws; the path version scores them through the inverse instead of the
    # cache, so only float32 rounding (iaf: D sequential passes) separates the values.
    assert path == pytest.approx(total, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("family", ["iaf", "realnvp"])
def test_path_gradient_is_unbiased(family):
    """The two estimators differ by the score term, whose mean under q is zero.

    On the same draws (common random numbers) the difference of the two gradients
    is the score term alone; over 40 independent batches its mean must be within 5
    standard errors of zero in every coordinate (a false alarm has probability below
    1e-6 per coordinate, a real bias of the size of the gradient is far outside).
    """
    model = twisted_gaussian().model
    guide = make_guide(model, family)
    differences = []
    for seed in range(40):
        guide._gradient = "total"
        _, total = loss_and_gradients(model, guide, 32, seed)
        guide._gradient = "path"
        _, path = loss_and_gradients(model, guide, 32, seed)
        differences.append(total - path)
    difference = torch.stack(differences).double()
    mean, standard_error = difference.mean(0), difference.std(0) / math.sqrt(len(differences))
    assert bool((mean.abs() <= 5 * standard_error + 1e-7).all())
    assert float(difference.abs().max()) > 0  # the score term is there to remove


@pytest.mark.parametrize("family", ["iaf", "maf", "realnvp"])
def test_path_gradient_vanishes_where_the_guide_is_exact(family):
    """At q = p the path gradient of every draw is zero; the total gradient is not.

    The guide of ``N(0, I)`` is set to loc 0 (``init_to_median`` starts it near 0)
    and scale 1; with its flow's parameters zeroed every layer is the identity, so
    q = p exactly and the path derivative of ``log p - log q`` vanishes draw by draw
    (the point of "sticking the landing").
    """
    guide = make_guide(gaussian_model, family)
    with torch.no_grad():
        guide.loc.zero_()
        for parameter in guide.flow.parameters():
            parameter.zero_()
    totals, paths = [], []
    for seed in range(5):
        guide._gradient = "total"
        totals.append(loss_and_gradients(gaussian_model, guide, 4, seed)[1])
        guide._gradient = "path"
        paths.append(loss_and_gradients(gaussian_model, guide, 4, seed)[1])
    assert float(torch.stack(paths).abs().max()) < 1e-5
    assert float(torch.stack(totals).var(0).sum()) > 1e-3


def test_path_gradient_guide_reads_leave_parameters_alone():
    guide = make_guide(twisted_gaussian().model, "iaf", gradient="path", base="student_t")
    before = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    with torch.no_grad():
        posterior = guide.get_posterior()
        posterior.log_prob(posterior.sample((10,)))
    after = guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_student_t_base_learns_its_degrees_of_freedom():
    model = twisted_gaussian().model
    guide = make_guide(model, "iaf", base="student_t")
    df = guide.base_df.detach().clone()
    assert df.shape == (2,) and bool((df > 1).all())
    assert "AutoFlow.base_df" in pyro.get_param_store()
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.1)
    for seed in range(3):
        optimizer.zero_grad()
        pyro.set_rng_seed(seed)
        Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0).loss_and_grads(
            model, guide
        )
        optimizer.step()
    assert not torch.equal(guide.base_df.detach(), df)


#: An AR(1) correlation of 0.9 in 4 dimensions.
AR_COVARIANCE = 0.9 ** (torch.arange(4.0)[:, None] - torch.arange(4.0)[None, :]).abs()


def correlated_gaussian_model() -> None:
    """``N(0, AR_COVARIANCE)`` in the default dtype: log Z = 0."""
    covariance = AR_COVARIANCE.to(torch.get_default_dtype())
    pyro.sample("z", dist.MultivariateNormal(torch.zeros(4), covariance))


def test_triangular_affine_log_det_matches_the_jacobian():
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoFlow(correlated_gaussian_model, flow="realnvp", affine="triangular", **SMALL)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the guide follows the model's dtype
    try:
        guide()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        guide.scale_tril_offdiag.normal_()
    transform = guide.get_transform()
    u = torch.randn(4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(transform, u)
    expected = torch.linalg.slogdet(jacobian).logabsdet
    assert float(transform.log_abs_det_jacobian(u, transform(u))) == pytest.approx(
        float(expected), abs=1e-10
    )
    with torch.no_grad():
        x = guide.get_posterior().sample((6,))
        assert torch.allclose(transform(transform.inv(x)), x, atol=1e-10)


@pytest.mark.parametrize("affine", ["diagonal", "triangular"])
def test_triangular_affine_alone_is_the_full_covariance_gaussian(affine):
    """With a parameter-free flow the guide is ``N(mu, L L^T)``: the triangular affine
    reaches the exact posterior (KL about 0), the diagonal one cannot go below the best
    mean-field KL, ``0.5 (sum_i log (Sigma^-1)_ii + log det Sigma)`` = 0.83 here.

    The bar, a fifth of the mean-field KL, sits far from both ends: the triangular
    guide's KL after training is the Monte Carlo noise of a converging Adam (well
    under 0.05), and the diagonal one is bounded below by 0.83 whatever its training.
    """
    mean_field_kl = 0.5 * float(
        torch.linalg.inv(AR_COVARIANCE).diagonal().log().sum() + torch.logdet(AR_COVARIANCE)
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    identity = torch.distributions.transforms.identity_transform
    guide = AutoFlow(correlated_gaussian_model, flow=lambda dim: identity, affine=affine)
    svi = pyro.infer.SVI(
        correlated_gaussian_model,
        guide,
        pyro.optim.Adam({"lr": 0.05}),
        Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=0),
    )
    for _ in range(400):
        svi.step()
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)
    with torch.no_grad():
        kl = elbo.loss(correlated_gaussian_model, guide)  # log Z = 0: the loss is KL
    if affine == "triangular":
        assert kl < 0.2 * mean_field_kl
    else:
        assert kl > 0.95 * mean_field_kl


@pytest.mark.parametrize(
    ("flow", "expected"),
    [("iaf", "triangular"), ("maf", "triangular"), ("realnvp", "diagonal"), ("cnf", "diagonal")],
)
def test_affine_default_per_family(flow, expected):
    pyro.clear_param_store()
    options = {"hidden_dims": (8,)} if flow == "cnf" else SMALL
    guide = AutoFlow(correlated_gaussian_model, flow=flow, **options)
    guide()
    assert hasattr(guide, "scale_tril_offdiag") == (expected == "triangular")
    stored = "AutoFlow.scale_tril_offdiag" in pyro.get_param_store()
    assert stored == (expected == "triangular")
    callable_guide = AutoFlow(
        correlated_gaussian_model, flow=lambda dim: realnvp(dim, num_layers=2, hidden_dims=(8,))
    )
    callable_guide()
    assert callable_guide._affine == "diagonal"


@pytest.mark.parametrize("flow", ["iaf", "maf", "realnvp", "cnf"])
def test_training_defaults_by_family_and_latent_size(flow):
    """Guides above GUIDE_SMALL_MAX_DIM latents get the triangular layer and the path
    gradient (iaf up to 100 latents); an explicit argument wins; smaller guides keep the
    total gradient, but cnf guides the path gradient."""
    large = GUIDE_SMALL_MAX_DIM + 1

    def wide_model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(large), 1.0).to_event(1))

    for options, expected in [
        ({}, guide_training_defaults(flow, large)),
        ({"affine": "diagonal", "gradient": "total"}, {"affine": "diagonal", "gradient": "total"}),
    ]:
        pyro.clear_param_store()
        sizes = {"hidden_dims": (8,)} if flow == "cnf" else {"num_layers": 2, "hidden_dims": (40,)}
        guide = AutoFlow(wide_model, flow=flow, **sizes, **options)
        guide()
        assert guide._affine == expected["affine"]
        assert hasattr(guide, "scale_tril_offdiag") == (expected["affine"] == "triangular")
        path = isinstance(guide.get_posterior(), PathDerivativeDistribution)
        assert path == (expected["gradient"] == "path")
    assert guide_training_defaults(flow, large) == {"affine": "triangular", "gradient": "path"}
    # iaf's path gradient costs D sequential passes per layer: above 100 latents it
    # keeps the total gradient; the others keep the path gradient at any size.
    assert guide_training_defaults(flow, 101)["gradient"] == ("total" if flow == "iaf" else "path")
    # Up to GUIDE_SMALL_MAX_DIM latents only cnf guides take the path gradient.
    assert guide_training_defaults(flow, GUIDE_SMALL_MAX_DIM)["gradient"] == (
        "path" if flow == "cnf" else "total"
    )

    def small_model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    pyro.clear_param_store()
    sizes = {"hidden_dims": (8,)} if flow == "cnf" else {"num_layers": 2, "hidden_dims": (40,)}
    guide = AutoFlow(small_model, flow=flow, **sizes)
    guide()
    path = isinstance(guide.get_posterior(), PathDerivativeDistribution)
    assert path == (flow == "cnf")


def _coupling_function_names(guide: AutoFlow) -> list[str]:
    return [
        type(layer.coupling_function).__name__
        for layer in guide.flow.layers
        if hasattr(layer, "coupling_function")  # not the glue layers
    ]


@pytest.mark.parametrize(
    ("flow", "options", "expected"),
    [
        ("iaf", {}, ["Affine", "RationalQuadraticSpline"] * 2 + ["Affine"]),
        ("iaf", {"num_layers": 4}, ["Affine", "RationalQuadraticSpline"] * 2),
        ("iaf", {"num_layers": 1}, ["Affine"]),
        ("iaf", {"coupling_function": "affine"}, ["Affine"] * 5),
        ("iaf", {"coupling": "spline"}, ["RationalQuadraticSpline"] * 5),
        ("iaf", {"coupling_kwargs": {"log_scale_bound": 2.0}}, ["Affine"] * 5),
        ("maf", {}, ["Affine", "RationalQuadraticSpline"] * 2 + ["Affine"]),
        ("maf", {"coupling_function": "affine"}, ["Affine"] * 5),
        ("realnvp", {}, ["RationalQuadraticSpline"] * 2 + ["Affine"] * 2),
        ("realnvp", {"num_layers": 6}, ["RationalQuadraticSpline"] * 2 + ["Affine"] * 4),
        ("realnvp", {"num_layers": 3}, ["Affine"] * 3),
        ("realnvp", {"coupling_function": "affine"}, ["Affine"] * 4),
    ],
)
def test_coupling_function_default_per_family(flow, options, expected):
    """iaf and maf guides interleave spline layers with affine ones (affine first and
    last) for any number of layers; realnvp guides give their first pair of layers
    (one per half of the coordinates) splines and the rest affine couplings, from four
    layers up; a coupling argument of the user's replaces the pattern."""
    pyro.clear_param_store()
    guide = AutoFlow(correlated_gaussian_model, flow=flow, hidden_dims=(8,), **options)
    guide()
    assert _coupling_function_names(guide) == expected
    if "coupling_kwargs" in options:
        bounds = [layer.coupling_function.log_scale_bound for layer in guide.flow.layers]
        assert bounds == [2.0] * 5
    assert guide.get_posterior().rsample((7,)).shape == (7, 4)  # a working stack


@pytest.mark.parametrize("flow", ["iaf", "maf"])
def test_spline_layers_only_up_to_their_dimension(flow):
    """Above ``GUIDE_SMALL_MAX_DIM`` latents the iaf and maf guides' layers are all affine."""
    assert guide_flow_defaults(flow, GUIDE_SMALL_MAX_DIM)["coupling_function"] == (
        interleaved_coupling_functions(5)
    )
    assert guide_flow_defaults(flow, GUIDE_SMALL_MAX_DIM + 1) == {}

    def wide_model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(GUIDE_SMALL_MAX_DIM + 1), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(wide_model, flow=flow, hidden_dims=(40,))
    guide()
    assert _coupling_function_names(guide) == ["Affine"] * 5


@pytest.mark.parametrize("family", ["iaf", "maf", "realnvp"])
def test_small_guides_get_the_final_multiplier(family):
    """iaf, maf and realnvp guides of up to ``GUIDE_SMALL_MAX_DIM`` latents build their
    conditioners (MADEs, MLPs) with ``GUIDE_SMALL_FINAL_MULTIPLIER``, whatever their
    coupling functions; above the cut, and where the user gives ``final_multiplier``,
    the builder's 1 or the user's value; cnf guides have no such conditioner."""
    assert GUIDE_SMALL_FINAL_MULTIPLIER < 1
    small = guide_flow_defaults(family, GUIDE_SMALL_MAX_DIM, {"coupling_function": "affine"})
    assert small == {"final_multiplier": GUIDE_SMALL_FINAL_MULTIPLIER}
    assert "final_multiplier" not in guide_flow_defaults(family, GUIDE_SMALL_MAX_DIM + 1)
    assert (
        guide_flow_defaults(family, 2, {"final_multiplier": 1.0, "coupling_function": "affine"})
        == {}
    )
    assert "final_multiplier" not in guide_flow_defaults("cnf", 2)

    def multipliers(dim: int, **options) -> set[float]:
        def model() -> None:
            pyro.sample("x", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

        pyro.clear_param_store()
        guide = AutoFlow(model, flow=family, hidden_dims=(8,), **options)
        guide()
        return {
            layer.conditioner.output.weight_multiplier
            for layer in guide.flow.layers
            if hasattr(layer, "conditioner")
        }

    assert multipliers(2) == {GUIDE_SMALL_FINAL_MULTIPLIER}
    assert multipliers(2, final_multiplier=0.5) == {0.5}
    assert multipliers(GUIDE_SMALL_MAX_DIM + 1) == {1.0}


def test_realnvp_guides_above_the_small_size_get_more_layers_and_lu_glue():
    """realnvp guides above ``GUIDE_SMALL_MAX_DIM`` latents get
    ``GUIDE_REALNVP_LARGE_LAYERS`` coupling layers with ``GUIDE_REALNVP_LARGE_PERMUTATION``
    glue layers between them up to ``GUIDE_REALNVP_LU_MAX_DIM`` latents and
    ``GUIDE_REALNVP_NO_GLUE_LAYERS`` glue-less ones above; a user's ``num_layers`` or
    ``permutation`` wins; below the cut (and for other families) the builder's
    defaults stay."""
    large = GUIDE_SMALL_MAX_DIM + 1
    assert guide_flow_defaults("realnvp", large) == {
        "num_layers": GUIDE_REALNVP_LARGE_LAYERS,
        "permutation": GUIDE_REALNVP_LARGE_PERMUTATION,
    }
    assert guide_flow_defaults("realnvp", large, {"num_layers": 3, "permutation": None}) == {}
    assert guide_flow_defaults("realnvp", GUIDE_SMALL_MAX_DIM)["coupling_function"] == (
        paired_coupling_functions(4)
    )
    # An LU layer holds D^2 parameters: above the cap, glue-less couplings.
    assert guide_flow_defaults("realnvp", GUIDE_REALNVP_LU_MAX_DIM) == {
        "num_layers": GUIDE_REALNVP_LARGE_LAYERS,
        "permutation": GUIDE_REALNVP_LARGE_PERMUTATION,
    }
    assert guide_flow_defaults("realnvp", GUIDE_REALNVP_LU_MAX_DIM + 1) == {
        "num_layers": GUIDE_REALNVP_NO_GLUE_LAYERS
    }

    def wide_model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(large), 1.0).to_event(1))

    def layer_names(guide: AutoFlow) -> list[str]:
        return [type(layer).__name__ for layer in guide.flow.layers]

    pyro.clear_param_store()
    guide = AutoFlow(wide_model, flow="realnvp", hidden_dims=(8,))
    guide()
    assert len(_coupling_function_names(guide)) == GUIDE_REALNVP_LARGE_LAYERS
    assert layer_names(guide)[1::2] == ["LULinear"] * (GUIDE_REALNVP_LARGE_LAYERS - 1)
    pyro.clear_param_store()
    guide = AutoFlow(wide_model, flow="realnvp", hidden_dims=(8,), num_layers=2, permutation=None)
    guide()
    assert len(_coupling_function_names(guide)) == 2
    assert layer_names(guide) == ["Coupling", "Coupling"]


def test_cnf_guide_defaults_and_more_blocks_above_the_small_size():
    """cnf guides get the scaled field, the training tolerances and backpropagation through
    the solver at every size, the exact trace up to ``CNF_EXACT_TRACE_MAX_DIM`` latents
    and, above ``GUIDE_SMALL_MAX_DIM``, ``GUIDE_CNF_LARGE_BLOCKS`` ODE blocks unless the
    user gives ``num_layers`` (or its alias ``num_blocks``), with PyTorch's initialisation
    of the fields' hidden layers (``GUIDE_CNF_LARGE_INIT``) unless the user chooses one,
    and tighter training tolerances (``GUIDE_CNF_LARGE_TOL``)."""
    small, large = GUIDE_SMALL_MAX_DIM, GUIDE_SMALL_MAX_DIM + 1
    common = {"state_scale": True, "rtol": 1e-3, "atol": 1e-3, "adjoint": False}
    assert guide_flow_defaults("cnf", small) == {**common, "trace": "exact"}
    assert guide_flow_defaults("cnf", large) == {
        **common,
        "trace": "hutchinson",
        "rtol": GUIDE_CNF_LARGE_TOL,
        "atol": GUIDE_CNF_LARGE_TOL,
        "num_layers": GUIDE_CNF_LARGE_BLOCKS,
        "init": GUIDE_CNF_LARGE_INIT,
    }
    for user in ({"num_layers": 1}, {"num_blocks": 3}):
        assert "num_layers" not in guide_flow_defaults("cnf", large, user)

    def wide_model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(large), 1.0).to_event(1))

    for options, blocks in (({}, GUIDE_CNF_LARGE_BLOCKS), ({"num_layers": 1}, 1)):
        pyro.clear_param_store()
        guide = AutoFlow(wide_model, flow="cnf", hidden_dims=(8,), **options)
        guide()
        ode_blocks = [m for m in guide.modules() if isinstance(m, ContinuousFlow)]
        assert len(ode_blocks) == blocks
        assert {block.dynamics.init for block in ode_blocks} == {GUIDE_CNF_LARGE_INIT}
    pyro.clear_param_store()
    guide = AutoFlow(wide_model, flow="cnf", hidden_dims=(8,), init="preserve")
    guide()
    assert {m.dynamics.init for m in guide.modules() if isinstance(m, ContinuousFlow)} == {
        "preserve"
    }


def test_bad_num_layers_gets_the_builders_error_not_the_defaults():
    with pytest.raises(ValueError, match="num_layers"):
        AutoFlow(correlated_gaussian_model, flow="iaf", num_layers=0)()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base": "cauchy"}, "base must be one of"),
        ({"gradient": "score"}, "gradient must be"),
        ({"affine": "full"}, "affine must be one of"),
    ],
)
def test_autoflow_rejects_unknown_base_gradient_and_affine(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoFlow(gaussian_model, **kwargs)


def conditioned_model() -> None:
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(z, 0.5), obs=torch.tensor(2.0))


def test_fit_guide_finds_a_conjugate_posterior():
    """Posterior N(1.6, 0.2): the guide's mean within 0.25 posterior sd of 1.6.

    The exact posterior is in the guide's family (the affine layer alone), and the
    guide starts at the prior's median 0, 3.6 posterior sds away; 0.25 sd leaves room
    for the Monte Carlo error of the 2000-draw mean (0.02 sd) and an unfinished fit.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    losses: list[float] = []
    guide = fit_guide(
        conditioned_model, steps=300, losses=losses, flow_options={"num_layers": 1, **SMALL}
    )
    assert len(losses) == 300
    with torch.no_grad():
        draws = guide.get_posterior().sample((2000,))
    assert abs(float(draws.mean()) - 1.6) < 0.25 * math.sqrt(0.2)


def test_fit_guide_keeps_the_last_good_parameters_on_a_non_finite_loss():
    def broken_model() -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("broken", z.sum(-1) * 0.0 - math.inf)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    untrained = AutoFlow(broken_model, **SMALL)
    untrained()
    initial = {k: v.detach().clone() for k, v in untrained.state_dict().items()}
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss") as raised:
        fit_guide(broken_model, steps=100, flow_options=SMALL)
    assert raised.value.step == MAX_REFUSED_UPDATES - 1
    trained = raised.value.guide.state_dict()
    assert all(torch.equal(trained[k], initial[k]) for k in initial)  # no update was made


def test_fit_guide_refusing_its_first_update_trains_on_without_a_scheduler_warning():
    """A non-finite first loss is refused; training goes on at the schedule's learning
    rate for the step count, without torch's "scheduler step before optimizer step"
    warning (the schedule follows the steps, refused ones included)."""
    broken = []

    def model_broken_once() -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        if z.dim() > 1 and not broken:  # step 0: the first call with a particle batch
            broken.append(True)
            pyro.factor("broken", z.sum(-1) * 0.0 - math.inf)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide = fit_guide(model_broken_once, steps=5, flow_options=SMALL, losses=losses)
    assert not any("lr_scheduler.step()" in str(w.message) for w in caught), caught
    assert not math.isfinite(losses[0]) and all(math.isfinite(loss) for loss in losses[1:])
    assert isinstance(guide, AutoFlow)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": "huge"}, "budget must be one of"),
        ({"steps": 0}, "steps must be positive"),
        ({"anneal": 1.5}, "anneal must be a fraction"),
        ({"anneal": -0.1}, "anneal must be a fraction"),
        ({"anneal": True}, "anneal must be a fraction"),
        ({"anneal_start": 0.0}, r"anneal_start must be in \(0, 1\], got 0.0"),
        ({"gradient_clip": 0.0}, r"gradient_clip must be positive \(inf: no clamp\)"),
        ({"gradient_clip": math.nan}, "gradient_clip must be positive"),
        ({"gradient_clip": "10"}, "gradient_clip must be positive"),
    ],
)
def test_fit_guide_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_guide(gaussian_model, **kwargs)


def test_optimization_step_clamps_gradient_elements_after_the_finiteness_check():
    """``gradient_clip`` clamps each element of a finite gradient (as Pyro's
    ``ClippedAdam``); an infinite gradient is still refused, not clamped into an
    update."""
    weight = torch.nn.Parameter(torch.zeros(3))
    sgd = torch.optim.SGD([weight], lr=1.0)
    loss = (weight * torch.tensor([100.0, -0.5, -30.0])).sum()
    assert optimization_step(loss, sgd, gradient_clip=10.0) is None
    assert torch.equal(weight.detach(), torch.tensor([-10.0, 0.5, 10.0]))

    at_zero = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([at_zero], lr=1.0)
    loss = torch.sqrt(at_zero).sum()  # finite loss, infinite gradient
    assert optimization_step(loss, sgd, gradient_clip=10.0) == "gradient"
    assert torch.equal(at_zero.detach(), torch.zeros(1))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 10.0),
        ({"budget": "high"}, math.inf),
        ({"gradient_clip": math.inf}, math.inf),
        ({"budget": "high", "gradient_clip": 5}, 5.0),
    ],
)
def test_fit_guide_clamps_as_its_preset_says(monkeypatch, kwargs, expected):
    """The default budget clamps each gradient element at 10 (Pyro's ``ClippedAdam``),
    ``"high"`` does not (as measured); ``gradient_clip`` overrides either."""
    clips = []

    def recording_step(loss, optimizer, **options):
        clips.append(options["gradient_clip"])
        return optimization_step(loss, optimizer, **options)

    monkeypatch.setattr(guide_training, "optimization_step", recording_step)
    pyro.clear_param_store()
    options = {"steps": 2, "num_particles": 2, "flow_options": SMALL}
    fit_guide(
        lambda: pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1)), **options, **kwargs
    )
    assert clips == [expected, expected]


@pytest.mark.parametrize("dim", [2, GUIDE_SMALL_MAX_DIM + 1])
def test_fit_guide_high_budget_builds_the_measured_guide(dim):
    """``budget="high"`` builds the guide its recipe was measured with at every size:
    eight glue-less affine couplings whose conditioners take no final multiplier, not
    ``AutoFlow``'s later small-guide defaults (a spline pair, the multiplier), which at
    the preset's constant lr 1e-3 would train the last layers eight times slower."""

    def model() -> None:
        pyro.sample("x", dist.Normal(torch.zeros(dim), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = fit_guide(model, budget="high", steps=1, num_particles=2)
    layers = guide.flow.layers
    assert [type(layer).__name__ for layer in layers] == ["Coupling"] * 8
    assert _coupling_function_names(guide) == ["Affine"] * 8
    assert {layer.conditioner.output.weight_multiplier for layer in layers} == {1.0}


def factor_model() -> None:
    """A latent site, an observed site and a factor: the last two are the likelihood."""
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(z, 0.5), obs=torch.tensor(2.0))
    pyro.factor("bonus", -(z**2))


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_temper_likelihood_scales_the_observed_sites_only(beta):
    """log p_beta(z, y) = log p(z) + beta (log p(y | z) + factor), at the same z."""
    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(temper_likelihood(factor_model, beta)).get_trace()
    z = trace.nodes["z"]["value"]
    expected = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + beta * dist.Normal(z, 0.5).log_prob(torch.tensor(2.0))
        - beta * z**2
    )
    assert torch.allclose(trace.log_prob_sum(), expected, rtol=0, atol=1e-6)
    assert trace.nodes["z"]["scale"] == 1.0


def test_temper_likelihood_composes_with_a_subsampled_plate():
    """A subsampled plate's scale (size / subsample size) and beta multiply: the tempered
    minibatch likelihood is beta times the plate's unbiased estimate."""

    def minibatch_model() -> None:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample_size=5):
            pyro.sample("y", dist.Normal(z, 1.0), obs=torch.zeros(5))

    trace = pyro.poutine.trace(temper_likelihood(minibatch_model, 0.25)).get_trace()
    assert trace.nodes["y"]["scale"] == pytest.approx(2.0 * 0.25)
    assert trace.nodes["z"]["scale"] == 1.0


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, math.nan, True, "0.5"])
def test_temper_likelihood_rejects_an_inverse_temperature_outside_0_1(beta):
    with pytest.raises(ValueError, match=r"inverse_temperature must be in \(0, 1\]"):
        temper_likelihood(factor_model, beta)


def test_temper_likelihood_at_beta_one_is_the_model_itself():
    assert temper_likelihood(factor_model, 1.0) is factor_model
    assert temper_likelihood(factor_model, 0.5) is not factor_model


@pytest.mark.parametrize(
    ("anneal", "start", "match"),
    [
        (2.0, 0.1, "anneal must be a fraction"),
        (-0.5, 0.1, "anneal must be a fraction"),
        (0.5, 0.0, r"start must be in \(0, 1\]"),
        (0.5, 1.5, r"start must be in \(0, 1\]"),
    ],
)
def test_annealed_inverse_temperature_rejects_a_bad_fraction_or_start(anneal, start, match):
    """A fraction above 1 would never reach beta = 1; a start outside (0, 1] is no beta."""
    with pytest.raises(ValueError, match=match):
        annealed_inverse_temperature(0, 100, anneal, start)


def test_annealed_inverse_temperature_rises_linearly_to_one():
    steps, anneal, start = 100, 0.3, 0.2
    betas = [annealed_inverse_temperature(step, steps, anneal, start) for step in range(steps)]
    assert betas[0] == start
    assert betas[15] == pytest.approx(start + (1 - start) * 15 / 30)
    assert all(a < b for a, b in zip(betas[:30], betas[1:31], strict=True))  # rising
    assert betas[30:] == [1.0] * 70
    assert {annealed_inverse_temperature(step, steps, 0.0, start) for step in range(steps)} == {1.0}


@given(
    steps=st.integers(1, 10_000),
    anneal=st.floats(0.0, 1.0),
    start=st.floats(1e-6, 1.0),
    data=st.data(),
)
def test_annealed_inverse_temperature_is_a_rising_beta_in_start_1(steps, anneal, start, data):
    """Every beta lies in [start, 1] and never falls; after ``anneal * steps`` it is 1."""
    step = data.draw(st.integers(0, steps - 1))
    beta = annealed_inverse_temperature(step, steps, anneal, start)
    following = annealed_inverse_temperature(min(step + 1, steps - 1), steps, anneal, start)
    assert start <= beta <= 1.0
    assert following >= beta
    if step >= anneal * steps:
        assert beta == 1.0


def test_fit_guide_trains_on_the_tempered_likelihood_first():
    """The first step's loss is the tempered model's (beta = anneal_start), to the bit,
    and not the model's; without annealing it is the model's."""

    def first_loss(model, **fit_options) -> float:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        losses: list[float] = []
        fit_guide(factor_model, steps=1, losses=losses, flow_options=SMALL, **fit_options)
        return losses[0]

    def loss_of(model) -> float:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlow(factor_model, **SMALL)
        guide()
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=math.inf)
        return float(elbo.differentiable_loss(model, guide).detach())

    tempered, untempered = loss_of(temper_likelihood(factor_model, 0.25)), loss_of(factor_model)
    assert tempered != untempered
    assert first_loss(factor_model, anneal=0.5, anneal_start=0.25) == tempered
    assert first_loss(factor_model, anneal=0.0) == untempered
