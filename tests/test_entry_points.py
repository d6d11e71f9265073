"""Pyro's other entry points with every flow family.

``JitTrace_ELBO`` (for ``AutoFlow`` guides and for flow density models), the parameter
store's ``save`` / ``clear`` / ``load`` round trip (``AutoFlow`` and
``AmortizedFlowGuide``), a stale parameter store, and
``AutoFlow.median`` / ``quantiles``. Every test runs once per family of
:data:`pyro_nf.flows.FLOW_BUILDERS`.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO

from pyro_nf.flows import FLOW_BUILDERS, flow_builder
from pyro_nf.infer import AmortizedFlowGuide, AutoFlow

FAMILIES = list(FLOW_BUILDERS)

SMALL = {
    "iaf": {"num_layers": 2, "hidden_dims": (16,)},
    "maf": {"num_layers": 2, "hidden_dims": (16,)},
    "realnvp": {"num_layers": 2, "hidden_dims": (16,)},
    # A fixed-step solver keeps the ODE family fast here.
    "cnf": {"hidden_dims": (16,), "method": "rk4", "options": {"step_size": 0.5}},
}

# torch.jit.trace cannot record a continuous flow: its log-density differentiates the
# vector field inside the forward pass (torch.autograd.grad, whose weights the tracer
# turns into constants), and an adaptive solver's step choice is data-dependent control
# flow that a trace would freeze. The family raises a clear error under a trace instead.
TRACEABLE = [f for f in FAMILIES if f != "cnf"]


def two_site_model():
    pyro.sample("a", dist.Normal(1.0, 2.0))
    pyro.sample("b", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))


def make_guide(family, model=two_site_model):
    guide = AutoFlow(model, flow=family, init_scale=0.5, **SMALL[family])
    guide()  # set up (this draws from the global random state)
    return guide


def store_tensors():
    return [p.unconstrained() for p in pyro.get_param_store().values()]


def loss_and_grads(elbo, model, guide, params, seed, *args):
    """The loss and the gradient of every parameter at one seed (gradients reset)."""
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, *args)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return loss, grads


# ------------------------------------------------------------------------ JitTrace_ELBO


@pytest.mark.parametrize("family", TRACEABLE)
def test_jit_elbo_equals_eager_elbo_for_autoflow(family):
    guide = make_guide(family)
    params = store_tensors()
    options = {"num_particles": 4, "vectorize_particles": True, "max_plate_nesting": 0}
    jit, eager = JitTrace_ELBO(**options), Trace_ELBO(**options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Pyro's own code
        loss_and_grads(jit, two_site_model, guide, params, seed=100)  # compiles
        for seed in range(3):  # the compiled graph, run again (maf failed here)
            jit_loss, jit_grads = loss_and_grads(jit, two_site_model, guide, params, seed)
            loss, grads = loss_and_grads(eager, two_site_model, guide, params, seed)
            # Same draws, same float32 arithmetic up to reordering: agreement to ~1e-6.
            assert jit_loss == pytest.approx(loss, rel=1e-5, abs=1e-5)
            for jit_grad, grad in zip(jit_grads, grads, strict=True):
                torch.testing.assert_close(jit_grad, grad, rtol=1e-4, atol=1e-5)
    flow_grads = [g for p, g in zip(params, jit_grads, strict=True) if p.dim() > 0]
    assert all(bool(g.abs().sum() > 0) for g in flow_grads), "a flow parameter got no gradient"


def _density_model(flow):
    def model(x):
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", flow(), obs=x)

    return model


def _no_guide(x):
    pass


@pytest.mark.parametrize("family", TRACEABLE)
def test_jit_elbo_trains_a_flow_density_model(family):
    pyro.set_rng_seed(0)
    flow = flow_builder(family)(dim=2, **SMALL[family])
    model = _density_model(flow)
    x = torch.randn(32, 2) * torch.tensor([1.0, 0.3]) + 1.0
    jit_svi = SVI(model, _no_guide, pyro.optim.Adam({"lr": 0.01}), JitTrace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit_losses = [jit_svi.step(x) for _ in range(5)]
    # The same five steps in eager mode from the same start give the same losses: the
    # density model has no random draws, so the trace must reproduce eager exactly
    # (up to float32 reordering).
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    flow = flow_builder(family)(dim=2, **SMALL[family])
    svi = SVI(_density_model(flow), _no_guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert jit_losses == pytest.approx(losses, rel=1e-5)
    assert jit_losses[-1] < jit_losses[0]


@pytest.mark.parametrize("use", ["guide", "density"])
def test_jit_elbo_with_a_continuous_flow_is_a_clear_error(use):
    if use == "guide":
        guide = make_guide("cnf")
        model, args = two_site_model, ()
        elbo = JitTrace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=0)
    else:
        model, guide = _density_model(flow_builder("cnf")(dim=2, **SMALL["cnf"])), _no_guide
        args, elbo = (torch.randn(8, 2),), JitTrace_ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="Trace_ELBO"):
            svi.step(*args)


# ------------------------------------------------------------------------- param store


def _train(model, guide, steps):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(steps):
        svi.step()


@pytest.mark.parametrize("family", FAMILIES)
def test_param_store_save_load_restores_every_flow_parameter(family, tmp_path):
    guide = make_guide(family)
    _train(two_site_model, guide, steps=5)
    saved = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    flow_names = [k for k in saved if k.startswith("AutoFlow.flow")]
    assert len(flow_names) == len(list(guide.flow.parameters())) > 0
    pyro.set_rng_seed(3)
    with torch.no_grad():
        before = guide.get_posterior().sample((5,))
    path = tmp_path / "store.pt"
    pyro.get_param_store().save(path)

    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    restored = make_guide(family)  # a fresh guide, built (with a fresh random init)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), saved[name]), name
    for name, parameter in restored.flow.named_parameters():
        # The module computes with the store's tensors themselves (so training them
        # trains the module), not with its own fresh initialization.
        key = f"AutoFlow.flow$$${name}"
        assert parameter is pyro.get_param_store().get_param(key), key
    pyro.set_rng_seed(3)
    with torch.no_grad():
        after = restored.get_posterior().sample((5,))
    assert torch.equal(after, before)

    # Further SVI steps train every flow layer of the restored guide.
    _train(two_site_model, restored, steps=3)
    store = pyro.get_param_store()
    frozen = [k for k in flow_names if torch.equal(store.get_param(k).detach(), saved[k])]
    assert not frozen, f"not trained after reloading: {frozen}"


def _conjugate_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)


def _amortized_guide(family):
    encoder = torch.nn.Linear(2, 4)
    flow = flow_builder(family)(dim=2, context_dim=4, **SMALL[family])
    return AmortizedFlowGuide(_conjugate_model, encoder, flow, site="z")


@pytest.mark.parametrize("family", ["iaf", "realnvp"])
def test_param_store_save_load_restores_an_amortized_guide(family, tmp_path):
    x = torch.randn(6, 2)
    guide = _amortized_guide(family)
    svi = SVI(_conjugate_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    saved = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.set_rng_seed(3)
    with torch.no_grad():
        before = guide.get_posterior(x).sample()
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    restored = _amortized_guide(family)  # fresh encoder and flow
    restored(x)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        assert torch.equal(restored.get_posterior(x).sample(), before)
    svi = SVI(_conjugate_model, restored, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi.step(x)
    store = pyro.get_param_store()
    frozen = [k for k in saved if torch.equal(store.get_param(k).detach(), saved[k])]
    assert not frozen, f"not trained after reloading: {frozen}"


def test_stale_param_store_is_a_clear_error():
    make_guide("iaf")  # a 3-dimensional latent

    def other_model():
        pyro.sample("c", dist.Normal(torch.zeros(5), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"'AutoFlow.loc' with shape \(3,\).*clear_param_store"):
        AutoFlow(other_model, flow="iaf", **SMALL["iaf"])()
    pyro.clear_param_store()
    assert AutoFlow(other_model, flow="iaf", **SMALL["iaf"])()["c"].shape == (5,)


def test_stale_flow_parameters_are_a_clear_error():
    make_guide("realnvp")  # hidden width 16
    kwargs = {**SMALL["realnvp"], "hidden_dims": (8,)}
    with pytest.raises(ValueError, match=r"AutoFlow\.flow\$\$\$.*clear_param_store"):
        AutoFlow(two_site_model, flow="realnvp", init_scale=0.5, **kwargs)()


# ------------------------------------------------------------------- median, quantiles

LEVELS = [0.05, 0.25, 0.5, 0.75, 0.95]


def _standard_normal_quantile(q):
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * q - 1.0)).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_quantiles_are_monte_carlo_estimates_of_the_guide(family):
    guide = make_guide(family)
    with torch.no_grad():
        # All-zero conditioners make every family's flow the identity or a fixed
        # permutation of the coordinates (checked), so the unconstrained latent is
        # exactly N(loc, scale^2) with known quantiles.
        for parameter in guide.flow.parameters():
            parameter.zero_()
        guide.loc.copy_(torch.tensor([1.0, -0.5, 0.3]))
        u = torch.randn(4, 3)
        loc, scale = guide.loc, guide.scale
        y = (guide.get_transform()(u) - loc) / scale
        order = y[0].argsort()
        torch.testing.assert_close(y, u[:, u[0].argsort()][:, order.argsort()])
    state = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.set_rng_seed(0)
    result = guide.quantiles(LEVELS)
    assert set(result) == {"a", "b"}
    assert result["a"].shape == (len(LEVELS),) and result["b"].shape == (len(LEVELS), 2)
    n = guide.num_quantile_samples
    for index, q in enumerate(LEVELS):
        z = _standard_normal_quantile(q)
        expected = loc + scale * z
        # Standard error of an empirical q-quantile: sqrt(q(1-q)/n) / density at it;
        # five of them bound a false failure below 1e-6 per coordinate.
        density = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
        tolerance = 5 * math.sqrt(q * (1 - q) / n) / density * scale.detach()
        assert abs(result["a"][index] - expected[0]) < tolerance[0]
        # "b" is LogNormal: the quantile maps through exp, its support's bijection.
        log_b = result["b"][index].log()
        assert bool((log_b - expected[1:]).abs().lt(tolerance[1:]).all())
    assert bool((result["b"] > 0).all())
    assert bool((result["a"].diff() > 0).all()), "quantiles must increase with the level"
    pyro.set_rng_seed(0)
    median = guide.median()
    assert median["a"].shape == () and median["b"].shape == (2,)
    assert torch.equal(median["a"], result["a"][LEVELS.index(0.5)])
    # A read never writes: estimating quantiles changed no parameter.
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), state[name]), name


@pytest.mark.parametrize("levels", [[], [1.5], [[0.5]]], ids=["empty", "above-one", "2-d"])
def test_quantiles_reject_bad_levels(levels):
    guide = make_guide("iaf")
    with pytest.raises(ValueError, match="quantiles"):
        guide.quantiles(levels)
