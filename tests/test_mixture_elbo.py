"""Learned mixture weights: ``StratifiedMixture`` with logits, ``AutoFlow(...,
mixture_weights="learned")`` and ``MixtureELBO``, which trains them."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions.transforms import AffineTransform

from pyro_nf.infer import AutoFlow, MixtureELBO, StratifiedMixture, fit_guide

SMALL = {"num_layers": 2, "hidden_dims": (8,)}


def gaussian_components(*means: float) -> list[dist.Distribution]:
    return [dist.Normal(torch.full((2,), m, dtype=torch.float64), 1.0).to_event(1) for m in means]


def identity_flow(dim: int) -> AffineTransform:
    """A flow with no parameters: each component of the guide is then a Gaussian."""
    return AffineTransform(0.0, 1.0, event_dim=1)


# A one-dimensional target with two modes of mass 0.7 and 0.3.
TARGET = dist.MixtureSameFamily(
    dist.Categorical(torch.tensor([0.7, 0.3], dtype=torch.float64)),
    dist.Normal(torch.tensor([-2.0, 2.0], dtype=torch.float64), 0.6),
)


WIDE = dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0)


def two_mode_model():
    """log p(z) = TARGET.log_prob(z): a wide normal prior and a factor for the rest."""
    z = pyro.sample("z", WIDE)
    pyro.factor("modes", TARGET.log_prob(z) - WIDE.log_prob(z))


def gaussian_mixture_guide(gradient: str = "total") -> AutoFlow:
    """Two Gaussian components at -1.5 and 1.0 with scales 0.8 and 0.5 and weights
    softmax(0.3, -0.2), all in float64."""
    pyro.clear_param_store()
    guide = AutoFlow(
        two_mode_model,
        flow=identity_flow,
        components=2,
        mixture_weights="learned",
        gradient=gradient,
    )
    guide()
    with torch.no_grad():
        guide.loc.copy_(torch.tensor([-1.5]))
        guide.loc_1.copy_(torch.tensor([1.0]))
        guide.mixture_logits.copy_(torch.tensor([0.3, -0.2]))
    guide.scale = torch.tensor([0.8], dtype=torch.float64)
    guide.scale_1 = torch.tensor([0.5], dtype=torch.float64)
    return guide


def leaves(guide: AutoFlow) -> list[torch.Tensor]:
    return [
        guide.loc,
        guide.loc_1,
        guide.scale_unconstrained,
        guide.scale_1_unconstrained,
        guide.mixture_logits,
    ]


def exact_stratified_elbo(guide: AutoFlow) -> torch.Tensor:
    """sum_k w_k E_{q_k}[log p(z) - log q(z)] by 100-point Gauss-Hermite quadrature per
    component, differentiable in the guide's parameters."""
    nodes, node_weights = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(100))
    node_weights = node_weights / math.sqrt(2 * math.pi)
    locs = torch.cat([guide.loc, guide.loc_1])
    scales = torch.cat([guide.scale, guide.scale_1])
    log_weights = guide.mixture_logits.log_softmax(-1)
    elbo = 0.0
    for k in range(2):
        z = locs[k] + scales[k] * nodes
        log_q = torch.logsumexp(
            log_weights + dist.Normal(locs, scales).log_prob(z.unsqueeze(-1)), -1
        )
        elbo = elbo + log_weights[k].exp() * (node_weights * (TARGET.log_prob(z) - log_q)).sum()
    return elbo


# ------------------------------------------------------- StratifiedMixture with weights


def test_log_prob_is_the_weighted_mixture_density():
    components = gaussian_components(-1.0, 0.5, 2.0)
    logits = torch.tensor([0.2, -1.0, 0.7], dtype=torch.float64)
    q = StratifiedMixture(components, logits)
    x = torch.randn(5, 2, dtype=torch.float64)
    density = sum(
        w * c.log_prob(x).exp() for w, c in zip(logits.softmax(-1), components, strict=True)
    )
    torch.testing.assert_close(q.log_prob(x), density.log())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-4.0, 4.0), min_size=1, max_size=6),
    st.integers(min_value=0, max_value=50),
)
def test_weighted_counts_are_the_floor_or_the_ceiling_of_n_w(logits, num_draws):
    logits = torch.tensor(logits, dtype=torch.float64)
    counts = StratifiedMixture([dist.Normal(0.0, 1.0)] * len(logits), logits).component_counts(
        num_draws
    )
    expected = num_draws * logits.softmax(-1)
    assert int(counts.sum()) == num_draws
    assert bool((counts >= expected.floor() - 1e-9).all())
    assert bool((counts <= expected.ceil() + 1e-9).all())


def test_weighted_counts_are_unbiased():
    """E[count_k] = n w_k: the mean of 20,000 calls is within five standard errors (each
    count is floor(n w_k) plus a Bernoulli(r_k), so its sd is sqrt(r_k (1 - r_k)))."""
    torch.manual_seed(0)
    weights = torch.tensor([0.13, 0.52, 0.35], dtype=torch.float64)
    q = StratifiedMixture([dist.Normal(0.0, 1.0)] * 3, weights.log())
    counts = torch.stack([q.component_counts(7) for _ in range(20_000)]).double()
    expected = 7 * weights
    remainders = expected - expected.floor()
    standard_error = (remainders * (1 - remainders) / 20_000).sqrt()
    assert bool(((counts.mean(0) - expected).abs() < 5 * standard_error).all())


def test_draws_follow_the_weights():
    q = StratifiedMixture(gaussian_components(-50.0, 50.0), torch.tensor([0.25, 0.75]).log())
    x = q.sample((1000,))
    assert int((x[:, 0] > 0).sum()) == 750
    # Shuffled: both components appear among the first draws.
    assert 0 < int((x[:20, 0] > 0).sum()) < 20


def test_blocks_draw_equal_counts_in_order():
    q = StratifiedMixture(
        gaussian_components(-50.0, 0.0, 50.0), torch.tensor([0.1, 0.1, 0.8]).log(), blocks=True
    )
    x = q.rsample((3, 2))
    assert x.shape == (3, 2, 2)
    blocks = x.reshape(3, 2, 2)[..., 0]
    assert bool((blocks[0] < -40).all() and (blocks[1].abs() < 10).all() and (blocks[2] > 40).all())
    with pytest.raises(ValueError, match="multiple of its 3 components, got 4"):
        q.rsample((4,))


def test_expand_keeps_the_weights_and_the_layout():
    logits = torch.tensor([0.0, 1.0])
    q = StratifiedMixture(gaussian_components(-1.0, 1.0), logits, blocks=True).expand((4,))
    assert q.batch_shape == (4,) and q.logits is logits and q.blocks


def test_logits_of_another_shape_are_a_clear_error():
    with pytest.raises(ValueError, match=r"logits must have shape \(2,\)"):
        StratifiedMixture(gaussian_components(-1.0, 1.0), torch.zeros(3))


# ------------------------------------------------------------- the guide's option


def test_learned_weights_start_equal_and_are_a_parameter():
    pyro.clear_param_store()
    guide = AutoFlow(two_mode_model, flow=identity_flow, components=3, mixture_weights="learned")
    guide()
    assert "AutoFlow.mixture_logits" in pyro.get_param_store()
    torch.testing.assert_close(
        guide.get_mixture_weights(), torch.full((3,), 1 / 3, dtype=torch.float64)
    )
    assert guide.get_mixture_weights().requires_grad
    posterior = guide.get_posterior()
    assert isinstance(posterior, StratifiedMixture) and not posterior.logits.requires_grad


def test_equal_weights_have_no_parameter():
    pyro.clear_param_store()
    guide = AutoFlow(two_mode_model, flow=identity_flow, components=2)
    guide()
    assert "AutoFlow.mixture_logits" not in pyro.get_param_store()
    assert not guide.get_mixture_weights().requires_grad
    assert guide.get_posterior().logits is None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"components": 1, "mixture_weights": "learned"}, "needs a guide of several flows"),
        ({"components": 2, "mixture_weights": "fixed"}, "mixture_weights must be one of"),
    ],
)
def test_bad_mixture_weights_are_errors_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        AutoFlow(two_mode_model, **options)


# ------------------------------------------------------------------------ MixtureELBO


@pytest.mark.parametrize("gradient", ["total", "path"])
def test_the_gradient_is_unbiased_for_the_exact_stratified_elbo(gradient):
    """The mean of 20 estimates (4000 draws per component each) of the value and of the
    gradient in every parameter (locations, scales, weights) is within four standard
    errors of the quadrature's exact value and gradient."""
    guide = gaussian_mixture_guide(gradient)
    exact = exact_stratified_elbo(guide)
    exact_gradient = torch.autograd.grad(exact, leaves(guide))
    elbo = MixtureELBO(num_particles=8000, max_plate_nesting=0)
    values, gradients = [], []
    for seed in range(20):
        pyro.set_rng_seed(seed)
        estimate = -elbo.differentiable_loss(two_mode_model, guide)
        values.append(estimate.detach())
        gradients.append(torch.cat(torch.autograd.grad(estimate, leaves(guide))))
    for samples, truth in (
        (torch.stack(values), exact.detach().reshape(1)),
        (torch.stack(gradients), torch.cat(exact_gradient)),
    ):
        samples = samples.reshape(len(samples), -1)
        standard_error = samples.std(0) / math.sqrt(len(samples))
        assert bool(((samples.mean(0) - truth).abs() <= 4 * standard_error + 1e-12).all()), (
            samples.mean(0),
            truth,
            standard_error,
        )
    # The weights' gradient is not zero: the check above tests something.
    assert exact_gradient[-1].abs().max() > 0.01


def test_trace_elbo_gives_the_weights_no_gradient():
    guide = gaussian_mixture_guide()
    loss = Trace_ELBO(num_particles=64, vectorize_particles=True).differentiable_loss(
        two_mode_model, guide
    )
    gradients = torch.autograd.grad(loss, leaves(guide), allow_unused=True)
    assert gradients[-1] is None or not bool(gradients[-1].any())
    assert gradients[0] is not None and bool(gradients[0].any())


class _NotReparametrizedNormal(dist.Normal):
    has_rsample = False


def test_trace_elbo_score_terms_leave_out_an_auxiliary_sites_log_q():
    """Why a guide cannot give its mixture weights a score term that every Pyro ELBO
    reads right (``docs/benchmarks/posteriors.md``, "Where the defaults stand").

    Guide ``u ~ N(0, sigma)``, not reparametrized and auxiliary (as an
    ``AutoContinuous`` guide's latent vector), ``z = u``; model ``z ~ N(0, 1)``. The
    ELBO is ``-sigma^2 / 2 + log sigma + c``: at ``sigma = 2`` the gradient of the loss
    is ``sigma - 1 / sigma = 1.5``, and ``sigma = 2`` without the entropy, the
    auxiliary site's ``log q``. ``TraceGraph_ELBO``'s score terms include it;
    ``Trace_ELBO``'s leave it out. Over 20 seeds at 20,000 draws the estimates had
    standard deviations 0.07 and 0.04, so 80,000 draws put each about 0.035 and 0.02
    from its mean, and 0.15 is more than four of those. If Pyro changes either, the
    docs' reason changes with it.
    """

    def model() -> None:
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide() -> None:
        sigma = pyro.param("sigma", torch.tensor(2.0))
        u = pyro.sample("u", _NotReparametrizedNormal(0.0, sigma), infer={"is_auxiliary": True})
        pyro.sample("z", dist.Delta(u))

    gradients = {}
    for elbo in (Trace_ELBO, TraceGraph_ELBO):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo(num_particles=80_000, vectorize_particles=True).loss_and_grads(model, guide)
        gradients[elbo.__name__] = float(pyro.param("sigma").grad)
    assert gradients["TraceGraph_ELBO"] == pytest.approx(1.5, abs=0.15)
    assert gradients["Trace_ELBO"] == pytest.approx(2.0, abs=0.15)


def test_svi_learns_the_masses_of_two_modes():
    """Components started on the two modes of the 0.7 / 0.3 target: the weights reach
    the masses (the ELBO's optimum there is q = p); the locations stay on the modes.

    Bar: |w_0 - 0.7| < 0.05. Over seeds 0-19 of this training the first weight ended at
    0.7001 (sd 0.0003, worst 0.0006 off), so the bar leaves room for other CPUs'
    arithmetic and fails weights that do not learn (they stay at 0.5, 0.2 off)."""
    guide = gaussian_mixture_guide()
    with torch.no_grad():
        guide.loc.fill_(-2.0)
        guide.loc_1.fill_(2.0)
    guide.scale = torch.tensor([0.6], dtype=torch.float64)
    guide.scale_1 = torch.tensor([0.6], dtype=torch.float64)
    pyro.set_rng_seed(0)
    optimizer = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.01 ** (1 / 300)})
    svi = SVI(two_mode_model, guide, optimizer, MixtureELBO(num_particles=32))
    for _ in range(300):
        svi.step()
    weights = guide.get_mixture_weights().detach()
    assert abs(float(weights[0]) - 0.7) < 0.05, weights


def test_one_flow_is_trace_elbo_to_the_bit():
    """For a one-flow guide, MixtureELBO draws the same points as Trace_ELBO and scores
    the same sum, on a model with a plate of data."""
    data = torch.randn(6)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 6):
            pyro.sample("y", dist.Normal(z[..., 0], 1.0), obs=data)

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="realnvp", **SMALL)
    guide()
    losses = []
    for elbo in (Trace_ELBO(num_particles=5, vectorize_particles=True), MixtureELBO(5)):
        pyro.set_rng_seed(3)
        losses.append(elbo.differentiable_loss(model, guide))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)


def test_plates_and_subsample_scales_count_per_draw():
    """A plate of data (subsampled: scale 2) gives the same loss as the same density
    written without a plate: the per-draw sums reach over the plate's dims."""
    data = torch.randn(6)

    def plated():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 6, subsample=torch.arange(3)):
            pyro.sample("y", dist.Normal(z[..., 0], 1.0), obs=data[:3])

    def flat():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with poutine.scale(scale=2.0):
            pyro.sample(
                "y",
                dist.Normal(z[..., :1], 1.0).expand(z.shape[:-1] + (3,)).to_event(1),
                obs=data[:3],
            )

    losses = []
    for model in (plated, flat):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoFlow(model, flow="realnvp", components=2, mixture_weights="learned", **SMALL)
        guide()
        with torch.no_grad():
            guide.mixture_logits.copy_(torch.tensor([0.4, -0.4]))
        pyro.set_rng_seed(1)
        losses.append(MixtureELBO(8).loss(model, guide))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_particles_round_up_to_a_multiple_of_the_components():
    shapes = []

    def model():
        shapes.append(pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1)).shape)

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="realnvp", components=3, mixture_weights="learned", **SMALL)
    MixtureELBO(num_particles=8, max_plate_nesting=0).loss(model, guide)
    assert shapes[-1] == (9, 2)


def test_guides_other_than_autoflow_are_a_clear_error():
    pyro.clear_param_store()
    guide = AutoNormal(two_mode_model)
    with pytest.raises(TypeError, match="MixtureELBO trains an AutoFlow guide"):
        MixtureELBO().loss(two_mode_model, guide)


@pytest.mark.parametrize("num_particles", [0, -2, 1.5, True, "8"])
def test_bad_particle_counts_are_clear_errors(num_particles):
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        MixtureELBO(num_particles=num_particles)


def test_a_loss_is_a_read_and_restores_the_draw_layout():
    guide = gaussian_mixture_guide()
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    MixtureELBO(16).loss(two_mode_model, guide)
    with torch.no_grad():
        MixtureELBO(16).differentiable_loss(two_mode_model, guide)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), before[name]), name

    def failing_model():
        pyro.sample("z", WIDE)
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed"):
        MixtureELBO(16, max_plate_nesting=0).loss(failing_model, guide)
    assert not guide.get_posterior().blocks
    assert not guide._drawing_in_blocks


def test_fit_guide_trains_learned_weights_and_trace_elbo_does_not():
    """fit_guide picks MixtureELBO for a guide with learned weights: they move from 1/2.
    Plain SVI with Trace_ELBO trains the flows and leaves the weights where they are."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = fit_guide(
        two_mode_model,
        flow=identity_flow,
        steps=30,
        flow_options={"components": 2, "mixture_weights": "learned"},
    )
    assert not torch.allclose(
        guide.get_mixture_weights().detach(), torch.full((2,), 0.5, dtype=torch.float64)
    )
    pyro.clear_param_store()
    guide = AutoFlow(two_mode_model, components=2, mixture_weights="learned", **SMALL)
    guide()
    locations = guide.loc.detach().clone()
    svi = SVI(two_mode_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(num_particles=4))
    for _ in range(5):
        svi.step()
    assert torch.equal(guide.mixture_logits.detach(), torch.zeros(2, dtype=torch.float64))
    assert not torch.equal(guide.loc.detach(), locations)


def test_a_batch_shape_past_the_plates_is_a_clear_error():
    """Trace_ELBO sums such a site over everything; a per-draw sum cannot place it."""

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 3):
            pyro.sample("y", dist.Normal(z[..., :1], 1.0), obs=torch.zeros(3))  # (n, 1, 3)

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="realnvp", components=2, mixture_weights="learned", **SMALL)
    with pytest.raises(ValueError, match="site 'y' has log-density shape .* dims left"):
        MixtureELBO(4).loss(model, guide)


def test_a_stale_store_of_another_component_count_is_a_clear_error():
    pyro.clear_param_store()
    AutoFlow(two_mode_model, flow=identity_flow, components=2, mixture_weights="learned")()
    three = AutoFlow(two_mode_model, flow=identity_flow, components=3, mixture_weights="learned")
    with pytest.raises(ValueError, match="'AutoFlow.mixture_logits' with shape"):
        three()


@pytest.mark.parametrize(
    ("flow_options", "learned"),
    [
        ({"components": 2}, True),
        ({"components": 2, "mixture_weights": "equal"}, False),
        ({"components": 2, "mixture_weights": "learned"}, True),
        ({}, False),
    ],
)
def test_fit_guide_learns_the_weights_of_several_flows_unless_told(flow_options, learned):
    pyro.clear_param_store()
    guide = fit_guide(two_mode_model, flow=identity_flow, steps=2, flow_options=flow_options)
    assert ("AutoFlow.mixture_logits" in pyro.get_param_store()) == learned
    assert guide.get_mixture_weights().requires_grad == learned


@pytest.mark.parametrize(
    ("anneal", "hold", "weights_move"),
    [(1.0, None, False), (1.0, True, False), (1.0, False, True), (0.5, None, True)],
)
def test_fit_guide_holds_learned_weights_while_annealing(anneal, hold, weights_move):
    """By default (``hold_weights_while_annealing``, the presets' True) the learned
    weights stay at 1/K, to the bit, while the likelihood is tempered (every step has
    beta < 1 at ``anneal=1.0``), and learn after it; the flows train throughout.
    ``hold_weights_while_annealing=False`` learns them from step 0."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    options = {"components": 2, "mixture_weights": "learned", **SMALL}
    guide = AutoFlow(two_mode_model, **options)
    guide()
    locations = guide.loc.detach().clone()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = fit_guide(
        two_mode_model,
        steps=10,
        anneal=anneal,
        hold_weights_while_annealing=hold,
        flow_options=options,
    )
    held = torch.equal(guide.mixture_logits.detach(), torch.zeros(2, dtype=torch.float64))
    assert held != weights_move
    assert not torch.equal(guide.loc.detach(), locations)


def test_holding_the_weights_keeps_a_non_finite_gradient_for_the_refusal():
    """The held logits' finite gradient is zeroed; a non-finite one stays, so that
    optimization_step refuses the update rather than applying the flows' part of it."""
    from pyro_nf.infer.guide_training import _backward_holding_weights
    from pyro_nf.infer.training import optimization_step

    pyro.clear_param_store()
    guide = AutoFlow(two_mode_model, components=2, mixture_weights="learned", **SMALL)
    guide()
    backward = _backward_holding_weights(guide)
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.1)
    locations = guide.loc.detach().clone()
    loss = (guide.mixture_logits * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()
    assert optimization_step(loss + guide.loc.sum(), optimizer, backward=backward) is None
    assert torch.equal(guide.mixture_logits.detach(), torch.zeros(2, dtype=torch.float64))
    assert not torch.equal(guide.loc.detach(), locations)
    locations = guide.loc.detach().clone()
    finite_loss = guide.mixture_logits[0].sqrt() + guide.loc.sum()  # d sqrt(a)/da = inf at 0
    assert math.isfinite(float(finite_loss))
    assert optimization_step(finite_loss, optimizer, backward=backward) == "gradient"
    assert torch.equal(guide.loc.detach(), locations)


def test_fit_guide_rejects_a_hold_that_is_not_a_bool():
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="hold_weights_while_annealing must be True or False"):
        fit_guide(two_mode_model, steps=1, hold_weights_while_annealing="yes")


def test_mixture_weights_before_the_first_call_are_a_clear_error():
    guide = AutoFlow(two_mode_model, flow=identity_flow, components=2, mixture_weights="learned")
    with pytest.raises(RuntimeError, match="call the guide .* first"):
        guide.get_mixture_weights()


@settings(max_examples=15, deadline=None)
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=2**31 - 1))
def test_one_flow_is_trace_elbo_for_any_particle_count_and_seed(num_particles, seed):
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    pyro.clear_param_store()
    guide = AutoFlow(model, flow="realnvp", **SMALL)
    guide()
    losses = []
    for elbo in (
        Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=0),
        MixtureELBO(num_particles, max_plate_nesting=0),
    ):
        pyro.set_rng_seed(seed)
        losses.append(elbo.loss(model, guide))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-5)


def test_elbo_for_guide_picks_the_loss_that_trains_every_parameter():
    """MixtureELBO for learned weights only; Trace_ELBO, vectorized, for the rest."""
    from pyro_nf.infer import elbo_for_guide

    cases = [
        (AutoFlow(two_mode_model, components=2, mixture_weights="learned"), MixtureELBO),
        (AutoFlow(two_mode_model, components=2), Trace_ELBO),
        (AutoFlow(two_mode_model), Trace_ELBO),
        (AutoNormal(two_mode_model), Trace_ELBO),
    ]
    for guide, kind in cases:
        elbo = elbo_for_guide(guide, 8, max_plate_nesting=0)
        assert type(elbo) is kind and elbo.num_particles == 8
        assert kind is MixtureELBO or elbo.vectorize_particles
