"""Mixtures of flows: ``EqualMixture`` and ``AutoFlow(model, components=K)``."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam

import pyro_nf
from pyro_nf.flows import FLOW_BUILDERS
from pyro_nf.infer import AutoFlow, EqualMixture, MixtureELBO, PathDerivativeDistribution

SMALL = {"num_layers": 2, "hidden_dims": (8,)}
FAMILY_KWARGS = {
    "cnf": {"hidden_dims": (8,), "method": "rk4", "options": {"step_size": 0.5}, "adjoint": False}
}


def small_kwargs(family: str) -> dict:
    return FAMILY_KWARGS.get(family, SMALL)


def normals(*means: float, dtype=torch.float64) -> list[dist.Distribution]:
    """Unit-variance 2-D normals, one per mean, with learnable locations."""
    return [
        dist.Normal(torch.full((2,), m, dtype=dtype, requires_grad=True), 1.0).to_event(1)
        for m in means
    ]


def two_site_model():
    pyro.sample("a", dist.Normal(1.0, 2.0))
    pyro.sample("b", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))


# ------------------------------------------------------------------- EqualMixture itself


def test_log_prob_is_the_mean_of_the_component_densities():
    components = normals(-1.0, 0.5, 3.0)
    q = EqualMixture(components)
    x = torch.randn(7, 2, dtype=torch.float64) * 3
    expected = torch.log(sum(c.log_prob(x).exp() for c in components) / 3)
    torch.testing.assert_close(q.log_prob(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sample_shape", [(), (0,), (1,), (6,), (4, 3), (2, 0)])
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 1)])
def test_shapes_follow_sample_and_batch_shapes(sample_shape, batch_shape):
    q = EqualMixture(normals(-1.0, 1.0)).expand(batch_shape)
    x = q.rsample(sample_shape)
    assert x.shape == torch.Size(sample_shape) + torch.Size(batch_shape) + (2,)
    if x.numel():  # torch's Independent cannot score an empty batch
        assert q.log_prob(x).shape == torch.Size(sample_shape) + torch.Size(batch_shape)
    assert q.batch_shape == batch_shape and q.event_shape == (2,)


@pytest.mark.parametrize("num_draws", [1, 2, 5, 8, 9])
def test_draws_are_stratified_over_the_components(num_draws):
    """Components far apart tell each draw's component by its sign: each gives
    ``n // K`` or one more draw, at every call."""
    q = EqualMixture(normals(-50.0, 0.0, 50.0))
    for seed in range(20):
        torch.manual_seed(seed)
        x = q.sample((num_draws,))[:, 0]
        counts = [int((x < -25).sum()), int(((x > -25) & (x < 25)).sum()), int((x > 25).sum())]
        assert sum(counts) == num_draws
        assert max(counts) - min(counts) <= 1, counts


def test_the_extra_draws_go_to_every_component_equally_often():
    """With ``n % K != 0`` the remainder's components are random, so each component's
    expected share is exactly ``1 / K`` (the estimate stays unbiased)."""
    q = EqualMixture(normals(-50.0, 50.0))
    torch.manual_seed(0)
    first = sum(int(q.sample((1,))[0, 0] < 0) for _ in range(2000))
    # Binomial(2000, 1/2): sd 22.4; 5 sd either side.
    assert abs(first - 1000) < 5 * math.sqrt(2000 * 0.25), first


def test_draws_follow_the_mixture():
    """Moments of many stratified draws against the mixture's (means -1 and 3, sd 1):
    mean 1, variance 1 + 4 = 5."""
    q = EqualMixture(normals(-1.0, 3.0))
    torch.manual_seed(0)
    x = q.sample((40_000,))
    se_mean, se_var = math.sqrt(5 / 40_000), 5 * math.sqrt(2 / 40_000) * 2
    assert torch.all((x.mean(0) - 1.0).abs() < 5 * se_mean)
    assert torch.all((x.var(0) - 5.0).abs() < 5 * se_var)


def test_the_gradient_of_a_draw_average_is_the_mixture_gradient():
    """d/dmu_k E_q[x . x] = (1/K) 2 mu_k: each draw is reparametrized through its own
    component, and the stratified average carries each component's weight 1/K."""
    components = normals(-1.0, 2.0)
    q = EqualMixture(components)
    torch.manual_seed(0)
    x = q.rsample((20_000,))
    (x * x).sum(-1).mean().backward()
    for component, mean in zip(components, (-1.0, 2.0), strict=True):
        grad = component.base_dist.loc.grad
        # Each coordinate: (1/n) sum over ~n/2 draws of 2 x_i, sd 2 / sqrt(2n) * ... < 0.03.
        torch.testing.assert_close(grad, torch.full_like(grad, mean), rtol=0, atol=0.06)


@pytest.mark.parametrize(
    "components, match",
    [
        ([], "at least one component"),
        ([dist.Normal(torch.zeros(3, 2), 1.0).to_event(1)], "batch_shape"),
        (
            [
                dist.Normal(torch.zeros(2), 1.0).to_event(1),
                dist.Normal(torch.zeros(3), 1.0).to_event(1),
            ],
            "one event shape",
        ),
        ([dist.Categorical(torch.ones(3))], "reparametrized"),
    ],
)
def test_bad_components_are_clear_errors(components, match):
    with pytest.raises(ValueError, match=match):
        EqualMixture(components)


# -------------------------------------------------------------- AutoFlow(components=K)


@pytest.mark.parametrize("family", list(FLOW_BUILDERS))
def test_a_mixture_guide_scores_the_mean_of_its_components(family):
    pyro.clear_param_store()
    guide = AutoFlow(two_site_model, flow=family, components=3, **small_kwargs(family))
    guide()
    posterior = guide.get_posterior()
    assert isinstance(posterior, EqualMixture) and posterior.num_components == 3
    x = torch.randn(5, 3)
    expected = torch.logsumexp(
        torch.stack([guide._component_posterior(k).log_prob(x) for k in range(3)]), 0
    ) - math.log(3)
    torch.testing.assert_close(posterior.log_prob(x), expected)
    # Components are separate flows with separate random starts.
    first, second = (guide._component_posterior(k).log_prob(x) for k in (0, 1))
    assert not torch.equal(first, second)


def test_one_component_is_the_single_flow_guide_unchanged():
    """``components=1`` builds the same guide, to the bit, as before the option."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    plain = AutoFlow(two_site_model, **SMALL)
    plain()
    names = sorted(pyro.get_param_store().keys())
    values = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    one = AutoFlow(two_site_model, components=1, **SMALL)
    one()
    assert sorted(pyro.get_param_store().keys()) == names
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), values[name]), name
    assert not isinstance(one.get_posterior(), EqualMixture)


@pytest.mark.parametrize("family", ["iaf", "realnvp"])
def test_svi_trains_every_component(family):
    pyro.clear_param_store()
    guide = AutoFlow(two_site_model, flow=family, components=2, **SMALL)
    guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    assert any(k.startswith("AutoFlow.flow_1$$$") for k in before)
    assert {"AutoFlow.loc_1", "AutoFlow.scale_1"} <= before.keys()
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(two_site_model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    for _ in range(3):
        svi.step()
    frozen = [k for k, v in pyro.get_param_store().items() if torch.equal(v.detach(), before[k])]
    assert not frozen, frozen


@pytest.mark.parametrize("gradient", ["total", "path"])
def test_a_mixture_guide_samples_sites_and_scores_under_predictive(gradient):
    pyro.clear_param_store()
    guide = AutoFlow(two_site_model, components=2, gradient=gradient, **SMALL)
    samples = Predictive(two_site_model, guide=guide, num_samples=7)()
    assert samples["a"].shape == (7,) and samples["b"].shape == (7, 2)
    assert bool((samples["b"] > 0).all())
    component = guide._component_posterior(1)
    path = gradient == "path"
    assert isinstance(component, PathDerivativeDistribution) == path


def test_the_path_gradient_mixture_scores_with_the_same_value():
    guides = {}
    for gradient in ("total", "path"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guides[gradient] = AutoFlow(two_site_model, components=2, gradient=gradient, **SMALL)
        guides[gradient]()
    total, path = guides["total"], guides["path"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(path.get_posterior().log_prob(x), total.get_posterior().log_prob(x))


def test_a_mixture_guide_has_no_single_map_for_neutra():
    pyro.clear_param_store()
    guide = AutoFlow(two_site_model, components=2, **SMALL)
    guide()
    with pytest.raises(ValueError, match="components=1 to use it with NeuTraReparam"):
        guide.get_transform()
    with pytest.raises(ValueError, match="components=1"):
        guide.get_base_dist()
    neutra = NeuTraReparam(guide.requires_grad_(False))
    with pytest.raises(ValueError, match="components=1"):
        poutine.reparam(two_site_model, config=lambda _: neutra)()


@pytest.mark.parametrize("components", [0, -1, 1.5, True, "2", None])
def test_bad_component_counts_are_errors_at_construction(components):
    with pytest.raises(ValueError, match="components must be a positive integer"):
        AutoFlow(two_site_model, components=components)


def test_a_flow_callable_must_build_a_new_flow_per_component():
    shared = pyro_nf.realnvp(3, **SMALL)
    guide = AutoFlow(two_site_model, flow=lambda dim: shared, components=2)
    with pytest.raises(ValueError, match="same module for two components"):
        guide()
    fresh = AutoFlow(two_site_model, flow=lambda dim: pyro_nf.realnvp(dim, **SMALL), components=2)
    pyro.clear_param_store()
    assert fresh()["b"].shape == (2,)


@pytest.mark.parametrize("weights", ["equal", "learned"])
def test_param_store_save_load_restores_every_component(tmp_path, weights):
    pyro.clear_param_store()
    guide = AutoFlow(two_site_model, components=2, mixture_weights=weights, **SMALL)
    loss = MixtureELBO(4) if weights == "learned" else Trace_ELBO()
    svi = SVI(two_site_model, guide, pyro.optim.Adam({"lr": 0.02}), loss)
    for _ in range(3):
        svi.step()
    x = torch.randn(6, 3)
    with torch.no_grad():
        before = guide.get_posterior().log_prob(x)
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    restored = AutoFlow(two_site_model, components=2, mixture_weights=weights, **SMALL)
    restored()
    with torch.no_grad():
        torch.testing.assert_close(restored.get_posterior().log_prob(x), before)
    if weights == "learned":
        assert not torch.equal(restored.get_mixture_weights(), torch.full((2,), 0.5))
        torch.testing.assert_close(restored.get_mixture_weights(), guide.get_mixture_weights())


def test_a_stale_store_of_another_size_is_a_clear_error():
    pyro.clear_param_store()
    AutoFlow(two_site_model, components=2, **SMALL)()
    other = AutoFlow(
        lambda: pyro.sample("z", dist.Normal(torch.zeros(5), 1.0).to_event(1)),
        components=2,
        **SMALL,
    )
    with pytest.raises(ValueError, match="earlier guide of the same name"):
        other()


@pytest.mark.parametrize("weights", ["equal", "learned"])
@pytest.mark.parametrize("gradient", ["total", "path"])
def test_reads_of_a_trained_mixture_guide_change_nothing(gradient, weights):
    """Losses, Predictive and PSIS (``train_then_read``), then the Monte Carlo
    quantiles and median, MixtureELBO's loss and a batch of one scored with autograd
    off: no parameter, buffer or param-store value of the trained mixture moves."""
    from test_reads import _changed, _snapshot, banana, train_then_read

    pyro.clear_param_store()
    guide = AutoFlow(banana, components=2, gradient=gradient, mixture_weights=weights, **SMALL)
    if weights == "learned":  # weights away from 1/2, so that a write would show
        guide()
        with torch.no_grad():
            guide.mixture_logits.copy_(torch.tensor([0.5, -0.5]))
    train_then_read(banana, guide, steps=5)
    before = _snapshot(guide)
    store_before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    guide.quantiles([0.25, 0.75])
    guide.median()
    MixtureELBO(8).loss(banana, guide)
    with torch.no_grad():
        posterior = guide.get_posterior()
        posterior.log_prob(posterior.sample((1,)))
    assert _changed(guide, before) == []
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), store_before[name]), f"{name} moved"


@pytest.mark.parametrize("weights", ["equal", "learned"])
def test_a_mixture_guide_follows_the_models_dtype(weights):
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(3, dtype=torch.float64), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(model, components=2, mixture_weights=weights, **SMALL)
    assert guide()["a"].dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in guide.parameters())
    assert guide.get_mixture_weights().dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("weights", ["equal", "learned"])
def test_a_mixture_guide_follows_the_models_device(weights):
    def model():
        pyro.sample("a", dist.Normal(torch.zeros(3, device="cuda"), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(model, components=2, mixture_weights=weights, **SMALL)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0)
    if weights == "learned":
        elbo = MixtureELBO(4, max_plate_nesting=0)
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step()
    assert guide()["a"].device.type == "cuda"
    assert all(p.device.type == "cuda" for p in guide.parameters())
    assert guide.get_mixture_weights().device.type == "cuda"
