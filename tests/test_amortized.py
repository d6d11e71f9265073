"""AmortizedFlowGuide.from_site, its default encoder and its amortized affine layer.

The hand-built guide (``AmortizedFlowGuide(model, encoder, flow)``) is tested in
``tests/test_infer.py``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_nf.infer.amortized import (
    RAW_FEATURES_MAX_DIM,
    AmortizedAffine,
    AmortizedFlowGuide,
    FeatureEncoder,
    first_argument_rows,
)

SMALL = {"num_layers": 2, "hidden_dims": (16,)}
NUM_OBSERVATIONS = 4


def grouped_model(x, noise):
    """``z_g ~ N(0, I_2)``, ``x_gj ~ N(z_g, noise_g^2)``; x: (G, n, 2), noise: (G,)."""
    with pyro.plate("groups", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("observations", x.shape[1]):
            pyro.sample("x", dist.Normal(z, noise[:, None]).to_event(1), obs=x.transpose(0, 1))


def grouped_features(x, noise):
    return torch.cat([x.flatten(1), noise.log()[:, None]], dim=-1)


def grouped_data(groups, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # log-uniform noise on [0.2, 2]: exact posterior sds from 0.1 to 0.7
    noise = (math.log(0.2) + math.log(10.0) * torch.rand(groups, generator=generator)).exp()
    z = torch.randn(groups, 2, generator=generator)
    x = z[:, None] + noise[:, None, None] * torch.randn(groups, NUM_OBSERVATIONS, 2)
    precision = 1 + NUM_OBSERVATIONS / noise**2
    loc = x.sum(1) / noise[:, None] ** 2 / precision[:, None]
    return x, noise, loc, precision.rsqrt()[:, None]


def test_from_site_builds_encoder_and_flow_from_the_site_at_the_first_call():
    x, noise, _, _ = grouped_data(6)
    guide = AmortizedFlowGuide.from_site(grouped_model, grouped_features, flow="maf", **SMALL)
    assert guide.flow is None and guide.encoder is None
    value = guide(x, noise)["z"]
    assert value.shape == (6, 2)
    # Nine features (at most RAW_FEATURES_MAX_DIM): the context is [features, MLP(features)].
    features = 2 * NUM_OBSERVATIONS + 1
    assert guide.flow.dim == 2 and guide.flow.context_dim == features + 16
    assert isinstance(guide.flow.layers[-1], AmortizedAffine)
    assert isinstance(guide.encoder, FeatureEncoder) and guide.encoder.raw_features
    assert guide.encoder.network.in_features == features
    names = set(pyro.get_param_store().keys())
    assert any(name.startswith("AmortizedFlowGuide.flow$$$") for name in names)
    assert any(name.startswith("AmortizedFlowGuide.encoder$$$") for name in names)


def test_from_site_without_the_affine_layer_ends_with_the_flow():
    x, noise, _, _ = grouped_data(6)
    guide = AmortizedFlowGuide.from_site(
        grouped_model, grouped_features, affine=False, flow="realnvp", **SMALL
    )
    guide(x, noise)
    assert len(guide.flow.layers) == SMALL["num_layers"]
    assert not any(isinstance(layer, AmortizedAffine) for layer in guide.flow.layers)


def test_feature_encoder_with_raw_features_puts_them_before_the_summary():
    encoder = FeatureEncoder(first_argument_rows, 6, context_dim=4, raw_features=True)
    x = torch.randn(5, 3, 2)
    context = encoder(x)
    assert encoder.out_features == 10 and context.shape == (5, 10)
    assert torch.equal(context[:, :6], x.flatten(1))
    assert torch.equal(context[:, 6:], encoder.network(x.flatten(1)))
    assert FeatureEncoder(first_argument_rows, 6, context_dim=4).out_features == 4


@pytest.mark.parametrize(
    "features, raw_features, raw",
    [
        pytest.param(RAW_FEATURES_MAX_DIM, None, True, id="default-small"),
        pytest.param(RAW_FEATURES_MAX_DIM + 1, None, False, id="default-large"),
        pytest.param(4, False, False, id="off"),
        pytest.param(RAW_FEATURES_MAX_DIM + 1, True, True, id="on"),
    ],
)
def test_from_site_raw_features_default_depends_on_the_feature_size(features, raw_features, raw):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    guide = AmortizedFlowGuide.from_site(model, raw_features=raw_features, **SMALL)
    assert guide(torch.randn(3, features))["z"].shape == (3, 2)
    assert guide.encoder.raw_features is raw
    assert guide.flow.context_dim == 16 + (features if raw else 0)


def test_from_site_default_features_are_the_first_argument_per_item():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    guide = AmortizedFlowGuide.from_site(model, **SMALL)
    assert guide(torch.randn(5, 4, 2))["z"].shape == (5, 3)
    assert guide.encoder.network.in_features == 8


@pytest.mark.parametrize(
    "family",
    [
        "iaf",
        pytest.param("realnvp", marks=pytest.mark.slow),
        pytest.param("maf", marks=pytest.mark.slow),
    ],
)
def test_from_site_recovers_per_item_posteriors_of_varying_width(family):
    pyro.set_rng_seed(0)
    x, noise, loc, scale = grouped_data(32)
    guide = AmortizedFlowGuide.from_site(
        grouped_model, grouped_features, flow=family, num_layers=2, hidden_dims=(32,)
    )
    svi = SVI(
        grouped_model,
        guide,
        # A learning rate decaying tenfold averages out the last steps' gradient noise.
        pyro.optim.ClippedAdam({"lr": 0.01, "lrd": 0.1 ** (1 / 400)}),
        Trace_ELBO(num_particles=8, vectorize_particles=True),
    )
    for _ in range(400):
        svi.step(x, noise)
    with torch.no_grad():
        draws = guide.get_posterior(x, noise).sample((4000,))
    # The exact posterior sds span 0.1 to 0.7 across the items, so a guide that fits one
    # width for all items fails both bars. Mean errors within 0.25 posterior sd and sd
    # ratios within 25% of 1 on average are the amortization error of an encoder
    # trained for 400 steps on 32 items; 4000 draws add a Monte Carlo error of 0.02 sd
    # and 1% of the sd, far below both bars.
    error = ((draws.mean(0) - loc).abs() / scale).mean()
    assert error < 0.25, error
    log_ratio = (draws.std(0) / scale).log().abs().mean()
    assert log_ratio < math.log(1.25), log_ratio


def test_from_site_guide_restores_from_the_param_store(tmp_path):
    x, noise, _, _ = grouped_data(6)

    def make():
        return AmortizedFlowGuide.from_site(grouped_model, grouped_features, **SMALL)

    guide = make()
    svi = SVI(grouped_model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(x, noise)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        before = guide.get_posterior(x, noise).sample()
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    restored = make()
    restored(x, noise)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        assert torch.equal(restored.get_posterior(x, noise).sample(), before)


def test_amortized_affine_log_det_is_the_autograd_jacobian():
    torch.manual_seed(0)
    layer = AmortizedAffine(3, context_dim=2).double()
    with torch.no_grad():
        layer.linear.weight.normal_()
    context, z = torch.randn(2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    transform = layer.condition(context)
    jacobian = torch.autograd.functional.jacobian(transform, z)
    expected = torch.linalg.slogdet(jacobian).logabsdet
    assert torch.allclose(transform.log_abs_det_jacobian(z, transform(z)), expected)
    assert torch.allclose(transform.inv(transform(z)), z)


def test_amortized_affine_starts_as_one_affine_map_for_every_item():
    layer = AmortizedAffine(2, context_dim=3, init_scale=0.5)
    transform = layer.condition(torch.randn(4, 3))
    z = torch.randn(4, 2)
    assert torch.allclose(transform(z), 0.5 * z)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"flow": "nope"}, ValueError, "unknown flow family", id="family"),
        pytest.param({"context_dim": 0}, ValueError, "context_dim", id="context"),
        pytest.param({"init_scale": -1.0}, ValueError, "init_scale", id="scale"),
        pytest.param({"features": 3}, TypeError, "callable", id="features"),
    ],
)
def test_from_site_rejects_bad_arguments_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        AmortizedFlowGuide.from_site(grouped_model, **kwargs)


def test_from_site_rejects_bad_features_and_sites_at_the_first_call():
    x, noise, _, _ = grouped_data(4)
    guide = AmortizedFlowGuide.from_site(grouped_model, lambda x, noise: x, **SMALL)
    with pytest.raises(ValueError, match="one row per item"):
        guide(x, noise)

    def scalar_site_model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    guide = AmortizedFlowGuide.from_site(scalar_site_model, **SMALL)
    with pytest.raises(ValueError, match="event shape"):
        guide(torch.randn(4, 2))
    with pytest.raises(ValueError, match="first positional argument"):
        first_argument_rows(x=torch.randn(3))
