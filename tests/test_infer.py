"""Flow autoguides, amortized guides and PSIS diagnostics (pyro_nf.infer)."""

import functools
import math
import subprocess
import sys

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.reparam import NeuTraReparam
from torch import nn

import pyro_nf
from pyro_nf import flows
from pyro_nf.flows import FLOW_BUILDERS, flow_builder
from pyro_nf.infer import (
    AmortizedFlowGuide,
    AutoFlow,
    importance_draws,
    psis_diagnostic,
    targets,
    to_inference_data,
)
from pyro_nf.infer.targets import funnel, twisted_gaussian
from pyro_nf.transforms import ContinuousFlow
from pyro_nf.transforms.base import FlowTransform

SMALL = {"num_layers": 2, "hidden_dims": (16,)}


FAMILIES = list(FLOW_BUILDERS)


FAMILY_KWARGS = {
    # A fixed-step solver keeps the fast tests fast; the slow ones use dopri5.
    "cnf": {"hidden_dims": (16,), "method": "rk4", "options": {"step_size": 0.5}, "adjoint": False},
}
LARGER_FAMILY_KWARGS = {
    "cnf": {"hidden_dims": (32, 32), "rtol": 1e-3, "atol": 1e-3, "adjoint": False},
}


def small_kwargs(family):
    return FAMILY_KWARGS.get(family, SMALL)


def two_site_model():
    pyro.sample("a", dist.Normal(1.0, 2.0))
    pyro.sample("b", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))


def one_dim_model():
    pyro.sample("a", dist.Normal(0.0, 1.0))


def run_svi(model, guide, steps, lr, particles=16, *args):
    svi = SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": lr}),
        Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0),
    )
    for _ in range(steps):
        svi.step(*args)


@torch.no_grad()
def elbo_gap(target, guide, num_samples=4000):
    """log Z - ELBO = KL(q || p), estimated with many vectorized guide draws."""
    elbo = Trace_ELBO(num_particles=num_samples, vectorize_particles=True, max_plate_nesting=0)
    return target.log_normalizer + elbo.loss(target.model, guide)


# ------------------------------------------------------------------------- AutoFlow


@pytest.mark.parametrize("family", FAMILIES)
def test_autoflow_starts_at_init_location_with_small_scale(family):
    guide = AutoFlow(two_site_model, flow=family, init_scale=0.05, **small_kwargs(family))
    guide()
    assert guide.latent_dim == 3
    init = guide._init_loc()
    assert torch.equal(guide.loc.detach(), init)
    assert torch.allclose(guide.scale.detach(), torch.full((3,), 0.05))
    with torch.no_grad():
        draws = guide.get_posterior().sample((2000,))
    # Near-identity flow layers: the posterior is close to N(init, 0.05^2). The layers
    # start near, not at, the identity: 0.02 (18 standard errors of a 2000-draw mean)
    # and 20% (13 standard errors of the standard deviation) bound their initial shift
    # and scaling, and would catch a flow that starts far from the identity.
    assert torch.allclose(draws.mean(0), init, atol=0.02)
    assert torch.allclose(draws.std(0), torch.full((3,), 0.05), rtol=0.2)


def test_autoflow_samples_every_site_in_its_support():
    guide = AutoFlow(two_site_model, flow="realnvp", **SMALL)
    sample = guide()
    assert sorted(sample) == ["a", "b"]
    assert sample["a"].shape == () and sample["b"].shape == (2,)
    assert bool((sample["b"] > 0).all())


def test_autoflow_default_flow_is_iaf():
    guide = AutoFlow(two_site_model)
    guide()
    assert any(type(layer).__name__ == "InverseAutoregressive" for layer in guide.flow.layers)


def test_autoflow_registers_flow_parameters_with_the_param_store():
    guide = AutoFlow(two_site_model, flow="realnvp", **SMALL)
    guide()
    names = set(pyro.get_param_store().keys())
    assert {"AutoFlow.loc", "AutoFlow.scale"} <= names
    flow_parameters = [name for name in names if name.startswith("AutoFlow.flow")]
    assert len(flow_parameters) == len(list(guide.flow.parameters()))


@pytest.mark.parametrize(
    "flow, kwargs, error, match",
    [
        pytest.param("glow", {}, ValueError, "unknown flow", id="unknown-name"),
        pytest.param("realnvp", {"depth": 3}, TypeError, "'depth'", id="unknown-kwarg"),
        pytest.param(3, {}, TypeError, "callable", id="not-callable"),
        pytest.param(
            lambda dim: flows.realnvp(dim), {"num_layers": 2}, ValueError, "keyword", id="kwargs"
        ),
        pytest.param("realnvp", {"init_scale": 0.0}, ValueError, "init_scale", id="zero-scale"),
        pytest.param("realnvp", {"init_scale": -1.0}, ValueError, "init_scale", id="neg-scale"),
    ],
)
def test_autoflow_rejects_bad_arguments_at_construction(flow, kwargs, error, match):
    with pytest.raises(error, match=match):
        AutoFlow(two_site_model, flow=flow, **kwargs)


def test_autoflow_realnvp_on_one_dimensional_latent_suggests_iaf():
    guide = AutoFlow(one_dim_model, flow="realnvp")
    with pytest.raises(ValueError, match="1-dimensional latent.*maf/iaf"):
        guide()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "realnvp"])
def test_autoflow_one_dimensional_latent(family):
    guide = AutoFlow(one_dim_model, flow=family, **small_kwargs(family))
    assert guide()["a"].shape == ()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda dim: flows.realnvp(dim, **SMALL), id="returns-flow"),
        pytest.param(
            lambda dim: pyro_nf.Coupling(torch.arange(dim) < 1, hidden_dims=(8,)),
            id="returns-transform-module",
        ),
        pytest.param(lambda dim: dist.transforms.Planar(dim), id="returns-pyro-transform"),
    ],
)
def test_autoflow_with_a_callable_flow_trains(make):
    guide = AutoFlow(two_site_model, flow=make)
    guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    run_svi(two_site_model, guide, steps=3, lr=0.05, particles=4)
    after = dict(pyro.get_param_store().items())
    changed = [k for k in before if not torch.equal(before[k], after[k].detach())]
    flow_changed = [k for k in changed if k.startswith("AutoFlow.flow")]
    assert flow_changed, "the flow's parameters did not move"


def test_autoflow_rejects_conditional_flow_and_wrong_dim():
    guide = AutoFlow(two_site_model, flow=lambda dim: flows.realnvp(dim, context_dim=2, **SMALL))
    with pytest.raises(ValueError, match="unconditional"):
        guide()
    guide = AutoFlow(two_site_model, flow=lambda dim: flows.realnvp(dim + 1, **SMALL))
    with pytest.raises(ValueError, match="dim=4 but the latent has dim=3"):
        guide()


def test_autoflow_vectorized_particles_and_predictive():
    guide = AutoFlow(two_site_model, flow="realnvp", **SMALL)
    run_svi(two_site_model, guide, steps=5, lr=0.01, particles=4)
    samples = Predictive(two_site_model, guide=guide, num_samples=7)()
    assert samples["a"].shape == (7,) and samples["b"].shape == (7, 2)
    parallel = Predictive(two_site_model, guide=guide, num_samples=7, parallel=True)()
    assert parallel["b"].shape == (7, 2)


def _count_passes(layers):
    counts = {"forward": 0, "inverse": 0, "state only": 0}

    def wrap(method, key):
        @functools.wraps(method)
        def counted(*args, **kwargs):
            counts[key] += 1
            return method(*args, **kwargs)

        return counted

    for layer in layers:
        if isinstance(layer, FlowTransform):
            layer.forward_and_log_det = wrap(layer.forward_and_log_det, "forward")
            layer.inverse_and_log_det = wrap(layer.inverse_and_log_det, "inverse")
        if isinstance(layer, ContinuousFlow):
            layer.forward_without_log_det = wrap(layer.forward_without_log_det, "state only")
    return counts


@pytest.mark.parametrize("gradient", ["total", "path"])
@pytest.mark.parametrize("family", FAMILIES)
def test_autoflow_elbo_costs_one_sampling_pass_per_layer(family, gradient):
    guide = AutoFlow(two_site_model, flow=family, gradient=gradient, **small_kwargs(family))
    guide()
    layers = [layer for layer in guide.flow.layers if isinstance(layer, FlowTransform)]
    counts = _count_passes(layers)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=0)
    loss.differentiable_loss(two_site_model, guide).backward()
    # rsample runs z -> x once per layer. With the total gradient log_prob of the same
    # draws reads the caches; the path gradient scores them with detached parameters,
    # one inverse call per layer (the cost its docstring states), and never reads the
    # draw's log-det, so a CNF layer solves its state alone.
    path = gradient == "path"
    state_only = len(layers) if path and family == "cnf" else 0
    assert counts == {
        "forward": len(layers) - state_only,
        "inverse": len(layers) if path else 0,
        "state only": state_only,
    }


def test_autoflow_follows_the_models_dtype():
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    guide = AutoFlow(model, flow="realnvp", **SMALL)
    assert guide()["a"].dtype == torch.float64
    assert {p.dtype for p in guide.parameters()} == {torch.float64}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_autoflow_follows_the_models_device():
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(3, device="cuda"), 1.0).to_event(1))

    guide = AutoFlow(model, flow="realnvp", **SMALL)
    assert guide()["a"].device.type == "cuda"
    assert {p.device.type for p in guide.parameters()} == {"cuda"}
    assert {b.device.type for b in guide.buffers()} == {"cuda"}
    run_svi(model, guide, steps=2, lr=0.01, particles=4)


def test_neutra_reparam_with_autoflow_runs_nuts():
    target = twisted_gaussian()
    guide = AutoFlow(target.model, flow="realnvp", init_scale=1.0, **SMALL)
    run_svi(target.model, guide, steps=20, lr=0.01)
    neutra = NeuTraReparam(guide.requires_grad_(False))
    model = neutra.reparam(target.model)
    mcmc = MCMC(NUTS(model, max_tree_depth=4), num_samples=10, warmup_steps=10)
    mcmc.run()
    latent = mcmc.get_samples()["x_shared_latent"]
    assert latent.shape == (10, 2)
    assert neutra.transform_sample(latent)["x"].shape == (10, 2)


# ---------------------------------------------------------- ELBO against AutoNormal


def _fit_guides(target, family, steps, lr, flow_kwargs):
    pyro.set_rng_seed(0)
    normal = AutoNormal(target.model, init_scale=1.0)
    run_svi(target.model, normal, steps, lr)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    flow_guide = AutoFlow(target.model, flow=family, init_scale=1.0, **flow_kwargs)
    run_svi(target.model, flow_guide, steps, lr)
    return normal, flow_guide


@pytest.mark.parametrize("family", FAMILIES)
def test_autoflow_beats_autonormal_on_banana_fast(family):
    target = twisted_gaussian()
    normal, flow_guide = _fit_guides(target, family, 150, 0.01, small_kwargs(family))
    normal_gap, flow_gap = elbo_gap(target, normal), elbo_gap(target, flow_guide)
    # AutoNormal's KL here is the cost of not bending (about 1.5 nats); after 150 steps
    # a flow must have removed a quarter of it. The estimates' Monte Carlo error (4000
    # draws) is about 0.02 nats, far below that margin.
    assert flow_gap < 0.75 * normal_gap, (flow_gap, normal_gap)


TARGETS = {"banana": twisted_gaussian, "funnel": funnel}


@functools.cache
def _slow_gaps(target_name, family):
    """KL(q || p) of AutoNormal and of the flow guide after 1000 steps, and k-hat."""
    target = TARGETS[target_name]()
    kwargs = LARGER_FAMILY_KWARGS.get(family, {"num_layers": 4, "hidden_dims": (32, 32)})
    normal, flow_guide = _fit_guides(target, family, 1000, 0.005, kwargs)
    khat = psis_diagnostic(target.model, flow_guide, num_samples=4000).khat
    return elbo_gap(target, normal), elbo_gap(target, flow_guide), khat


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target_name", list(TARGETS))
def test_autoflow_beats_autonormal(target_name, family):
    # With its layers at the identity a flow guide *is* AutoNormal's family, so at the
    # same budget every family, the ODE one included, must end below AutoNormal's KL.
    normal_gap, flow_gap, _ = _slow_gaps(target_name, family)
    assert flow_gap < normal_gap, (flow_gap, normal_gap)


# Where one layer of a family can carry the exact map from a Gaussian to the target, its
# guide must remove at least half of AutoNormal's KL (the cost of the shape a Gaussian
# cannot take) in 1000 steps. The banana's map is x2 -> x2 + (x1^2 - 1): one affine
# coupling or autoregressive shift, or the time-constant vector field (0, x1^2 - 1). The
# funnel's is x_i -> x_i exp(v / 2): one affine layer's scale given v, or for the ODE
# guide (whose fields scale the state, s(z, t) * z + m(z, t)) the rate s_i = v / (2T).
EXACT_IN_ONE_LAYER = [(name, family) for name in ("banana", "funnel") for family in FAMILIES]


@pytest.mark.slow
@pytest.mark.parametrize("target_name, family", EXACT_IN_ONE_LAYER)
def test_autoflow_closes_half_the_gap_where_one_layer_is_exact(target_name, family):
    normal_gap, flow_gap, khat = _slow_gaps(target_name, family)
    assert flow_gap < 0.5 * normal_gap, (flow_gap, normal_gap)
    if target_name == "banana":
        # PSIS: importance sampling with the guide is usable (k-hat below 0.7).
        if family == "cnf" and khat >= 0.7:
            # A known gap of the CNF guide (issue 10, item 4), not a bar fitted away: at
            # this budget its k-hat over seeds 0-3 was 0.80, 0.40, 0.66 and 0.25 with
            # init="preserve", and 0.74 at seed 0 with PyTorch's init, while its KL bar
            # above holds on every seed.
            pytest.xfail(f"CNF guide's k-hat on the banana is {khat:.2f} at this budget")
        assert khat < 0.7


@pytest.mark.slow
def test_neutra_improves_nuts_ess_on_funnel():
    target = funnel()
    pyro.set_rng_seed(0)
    guide = AutoFlow(target.model, flow="realnvp", init_scale=1.0, num_layers=4)
    run_svi(target.model, guide, 1000, 0.005)
    guide.requires_grad_(False)

    def ess_of_v(model, transform=None):
        pyro.set_rng_seed(1)
        mcmc = MCMC(NUTS(model), num_samples=300, warmup_steps=300)
        mcmc.run()
        samples = mcmc.get_samples()
        x = samples["x"] if transform is None else transform(samples["x_shared_latent"])["x"]
        v = x[:, 0].numpy()
        return float(az.ess(v[None])), x

    plain_ess, _ = ess_of_v(target.model)
    neutra = NeuTraReparam(guide)
    neutra_ess, x = ess_of_v(neutra.reparam(target.model), neutra.transform_sample)
    # NeuTra's point is a better-mixing chain on the funnel's neck: at least twice the
    # effective draws of v, a gain beyond the ESS estimate's own noise.
    assert neutra_ess > 2 * plain_ess, (neutra_ess, plain_ess)
    assert abs(float(x[:, 0].mean())) < 0.75  # v ~ N(0, 9): a quarter of its sd


# ------------------------------------------------------------------ amortized guide

SIGMA = 0.5
DATA_DIM = 2


def conjugate_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(DATA_DIM), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, SIGMA).to_event(1), obs=x)


@pytest.mark.parametrize("family", ["realnvp", "iaf"])
def test_amortized_guide_recovers_conjugate_posterior(family):
    pyro.set_rng_seed(0)
    x = torch.randn(32, DATA_DIM) * math.sqrt(1 + SIGMA**2)
    flow = flow_builder(family)(DATA_DIM, context_dim=4, **small_kwargs(family))
    guide = AmortizedFlowGuide(conjugate_model, nn.Linear(DATA_DIM, 4), flow, site="z")
    # A learning rate decaying tenfold averages out the last steps' gradient noise.
    svi = SVI(
        conjugate_model,
        guide,
        pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.1 ** (1 / 300)}),
        Trace_ELBO(num_particles=8, vectorize_particles=True),
    )
    for _ in range(300):
        svi.step(x)
    with torch.no_grad():
        draws = guide.get_posterior(x).sample((4000,))
    exact_mean, exact_variance = x / (1 + SIGMA**2), SIGMA**2 / (1 + SIGMA**2)
    # A third of the exact posterior sd (0.45) over all 64 coordinates, and 30% of its
    # variance: the amortization error of a linear encoder after 300 steps; the Monte
    # Carlo error of 4000 draws (0.007 and 2%) is far smaller.
    assert (draws.mean(0) - exact_mean).abs().max() < 0.15
    variance = draws.var(0)
    assert bool(((variance / exact_variance - 1).abs() < 0.3).all()), variance


def test_amortized_guide_under_predictive_and_constrained_support():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            scale = pyro.sample("scale", dist.LogNormal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(0.0, scale).to_event(1), obs=x)

    x = torch.randn(5, 2)
    flow = flows.realnvp(2, context_dim=2, **SMALL)
    guide = AmortizedFlowGuide(model, nn.Identity(), flow, site="scale")
    value = guide(x)["scale"]
    assert value.shape == (5, 2) and bool((value > 0).all())
    samples = Predictive(model, guide=guide, num_samples=3)(x)
    assert samples["scale"].shape == (3, 5, 2)


@pytest.mark.parametrize(
    "site, flow_dim, context_dim, match",
    [
        pytest.param("w", 2, 2, "no latent site 'w'", id="missing-site"),
        pytest.param("x", 2, 2, "no latent site 'x'", id="observed-site"),
        pytest.param("z", 3, 2, "event shape", id="wrong-dim"),
    ],
)
def test_amortized_guide_rejects_bad_sites(site, flow_dim, context_dim, match):
    flow = flows.realnvp(flow_dim, context_dim=context_dim, **SMALL)
    guide = AmortizedFlowGuide(conjugate_model, nn.Linear(DATA_DIM, context_dim), flow, site)
    with pytest.raises(ValueError, match=match):
        guide(torch.randn(4, DATA_DIM))


def test_amortized_guide_needs_a_conditional_flow():
    with pytest.raises(ValueError, match="conditional"):
        AmortizedFlowGuide(conjugate_model, nn.Identity(), flows.realnvp(2, **SMALL))


# ---------------------------------------------------------------------- diagnostics

OBSERVED = 1.5
POSTERIOR_MEAN = OBSERVED / (1 + SIGMA**2)
POSTERIOR_STD = math.sqrt(SIGMA**2 / (1 + SIGMA**2))
LOG_EVIDENCE = float(dist.Normal(0.0, math.sqrt(1 + SIGMA**2)).log_prob(torch.tensor(OBSERVED)))


def scalar_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, SIGMA), obs=torch.tensor(OBSERVED))


def normal_guide(loc, scale):
    def guide():
        pyro.sample("z", dist.Normal(loc, scale))

    return guide


def test_psis_exact_posterior_guide():
    guide = normal_guide(POSTERIOR_MEAN, POSTERIOR_STD)
    result = psis_diagnostic(scalar_model, guide, num_samples=2000)
    # The exact posterior makes every weight equal to p(x): k-hat is -inf (or tiny),
    # the ESS is S up to float32 rounding, and both estimates equal log p(x).
    assert result.khat < 0.5 and result.reliable
    assert result.ess > 0.95 * 2000
    assert result.log_evidence == pytest.approx(LOG_EVIDENCE, abs=1e-4)
    assert result.elbo == pytest.approx(LOG_EVIDENCE, abs=1e-4)


def test_psis_badly_mismatched_guide():
    guide = normal_guide(POSTERIOR_MEAN - 0.5, 0.3 * POSTERIOR_STD)
    result = psis_diagnostic(scalar_model, guide, num_samples=2000)
    # A Gaussian proposal with variance ratio r = 0.09 to the posterior gives weights
    # with a Pareto tail of shape k = 1 - r = 0.91 (infinite variance): few draws count.
    assert result.khat > 0.7 and not result.reliable
    assert result.ess < 0.2 * 2000


def test_psis_matches_direct_computation():
    guide = normal_guide(POSTERIOR_MEAN + 0.2, 1.3 * POSTERIOR_STD)
    result = psis_diagnostic(scalar_model, guide, num_samples=3000)
    z = result.samples["z"]
    assert z.shape == (3000,)
    direct = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z, SIGMA).log_prob(torch.tensor(OBSERVED))
        - dist.Normal(POSTERIOR_MEAN + 0.2, 1.3 * POSTERIOR_STD).log_prob(z)
    )
    assert torch.allclose(result.log_weights, direct, atol=1e-5)
    smoothed, khat = az.psislw(direct.double().numpy(), reff=1.0)
    assert result.khat == pytest.approx(float(khat))
    weights = np.exp(smoothed)
    assert result.ess == pytest.approx(1.0 / (weights**2).sum())
    direct_mean = float((weights * z.double().numpy()).sum())
    assert float(result.mean()["z"]) == pytest.approx(direct_mean, rel=1e-4)
    # A wide guide reweighted is a good estimator of the exact posterior moments: with an
    # ESS of about 2500, 0.05 is 5.6 standard errors of the mean and 10% of the variance
    # 3.5 standard errors.
    assert float(result.mean()["z"]) == pytest.approx(POSTERIOR_MEAN, abs=0.05)
    assert float(result.variance()["z"]) == pytest.approx(POSTERIOR_STD**2, rel=0.1)


@pytest.mark.parametrize("guide_scale", [1.3, 0.5], ids=["wide-guide", "narrow-guide"])
def test_psis_khat_agrees_with_pyro(guide_scale):
    from pyro.infer.importance import psis_diagnostic as pyro_psis_diagnostic

    guide = normal_guide(POSTERIOR_MEAN, guide_scale * POSTERIOR_STD)
    pyro.set_rng_seed(3)
    ours = psis_diagnostic(scalar_model, guide, num_samples=2000, max_plate_nesting=0)
    pyro.set_rng_seed(3)
    theirs = pyro_psis_diagnostic(scalar_model, guide, num_particles=2000, max_plate_nesting=0)
    assert ours.khat == pytest.approx(theirs, abs=1e-3)


def test_psis_expectation_rejects_wrong_shape():
    result = psis_diagnostic(scalar_model, normal_guide(0.0, 1.0), num_samples=100)
    with pytest.raises(ValueError, match="leading dimension 100"):
        result.expectation(lambda s: s["z"][:10])


def test_psis_non_finite_weights_raise():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("positive", torch.where(z > 0, 0.0, -math.inf))

    with pytest.raises(ValueError, match="not finite"):
        psis_diagnostic(model, normal_guide(0.0, 1.0), num_samples=100)


def _plated_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu[..., None] * torch.ones(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, scale[..., None]).to_event(1), obs=x)


def test_importance_draws_shapes_with_plates_and_batches():
    x = torch.randn(5, 2)
    guide = AutoNormal(_plated_model)
    guide(x)
    log_weights, draws = importance_draws(_plated_model, guide, x, num_samples=50, batch_size=20)
    assert log_weights.shape == (50,)
    assert {k: tuple(v.shape) for k, v in draws.items()} == {
        "mu": (50,),
        "scale": (50,),
        "z": (50, 5, 2),
    }
    assert bool((draws["scale"] > 0).all())


def test_to_inference_data_summary_and_pair_plot():
    import matplotlib

    matplotlib.use("Agg")
    x = torch.randn(5, 2)
    guide = AutoFlow(_plated_model, flow="realnvp", **SMALL)
    guide(x)
    idata = to_inference_data(_plated_model, guide, x, num_samples=200)
    assert idata.posterior["z"].shape == (1, 200, 5, 2)
    assert idata.posterior["scale"].shape == (1, 200)
    assert idata.sample_stats["log_weight"].shape == (1, 200)
    summary = az.summary(idata, var_names=["mu", "scale"], kind="stats")
    assert list(summary.index) == ["mu", "scale"]
    assert summary.loc["scale", "mean"] > 0
    axes = np.atleast_1d(az.plot_pair(idata, var_names=["mu", "scale"]))
    # One panel per pair of the two variables, with the draws on it.
    assert axes.size == 1 and axes.flat[0].collections
    matplotlib.pyplot.close("all")


def test_psis_result_to_inference_data_keeps_the_draws():
    result = psis_diagnostic(scalar_model, normal_guide(0.0, 1.0), num_samples=100)
    idata = result.to_inference_data()
    np.testing.assert_allclose(idata.posterior["z"].values[0], result.samples["z"].numpy())


def test_importance_draws_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_samples"):
        importance_draws(scalar_model, normal_guide(0.0, 1.0), num_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        importance_draws(scalar_model, normal_guide(0.0, 1.0), num_samples=10, batch_size=0)


def test_banana_target_is_the_twisted_gaussian_under_its_old_name():
    assert targets.banana is targets.twisted_gaussian
    assert targets.twisted_gaussian().name == "twisted_gaussian"


def test_import_pyro_nf_does_not_import_arviz():
    # ArviZ (with xarray and matplotlib) roughly doubled the import time; only the
    # diagnostics need it, and they import it when called.
    code = "import sys, pyro_nf; print(sorted(m for m in ('arviz', 'xarray') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_neutra_model_density_is_the_pushforward_of_the_target():
    target = twisted_gaussian()
    guide = AutoFlow(target.model, flow="realnvp", **SMALL)
    guide()
    neutra = NeuTraReparam(guide.requires_grad_(False))
    trace = poutine.trace(neutra.reparam(target.model)).get_trace()
    latent = trace.nodes["x_shared_latent"]["value"]
    transform = guide.get_transform()
    x = transform(latent)
    # The sampler's target over the base variable u is p(T(u)) |det dT/du|.
    expected = target.log_density(x) + transform.log_abs_det_jacobian(latent, x)
    assert torch.allclose(trace.log_prob_sum(), expected, atol=1e-4)
