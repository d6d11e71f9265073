"""Coupling flows beyond the contract: builders, the density-model use, the main job."""

import pytest
import torch

import pyro_nf
from pyro_nf import datasets
from pyro_nf.demo import fit_with_svi, gaussian_log_likelihood, main
from pyro_nf.transforms import Coupling, LULinear


@pytest.mark.parametrize("coupling", ["affine", "additive", "spline"])
@pytest.mark.parametrize("context_dim", [0, 2], ids=["unconditional", "conditional"])
def test_realnvp_log_prob_and_sample_shapes(coupling, context_dim):
    flow = pyro_nf.realnvp(
        3, num_layers=3, hidden_dims=(8,), coupling=coupling, context_dim=context_dim
    )
    context = torch.randn(4, 2) if context_dim else None
    distribution = flow(context)
    x = distribution.rsample((5,))
    assert x.shape == ((5, 4, 3) if context_dim else (5, 3))
    assert distribution.log_prob(x).shape == x.shape[:-1]
    assert torch.isfinite(distribution.log_prob(x)).all()


def test_realnvp_double_layer_transforms_every_coordinate():
    flow = pyro_nf.realnvp(5, num_layers=2)
    masks = [layer.mask for layer in flow.layers if isinstance(layer, Coupling)]
    assert torch.equal(masks[0], ~masks[1]), "consecutive layers must swap the halves"


@pytest.mark.parametrize("dim", [4, 5])
@pytest.mark.parametrize("permutation", [None, "reverse"])
def test_realnvp_double_layer_transforms_every_coordinate_with_its_glue(permutation, dim):
    """Two layers (with a reverse glue layer between them, or none) leave no output a
    copy of an input: a row of the Jacobian that is a unit vector is a coordinate that
    no layer transformed (with alternating masks a reverse glue layer swapped the halves
    back, so half the coordinates passed through every layer untouched)."""
    torch.manual_seed(0)
    flow = pyro_nf.realnvp(dim, num_layers=2, hidden_dims=(8,), permutation=permutation)
    flow.double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    jacobian = torch.autograd.functional.jacobian(flow.transform, torch.randn(dim).double())
    copies = [
        row for row in range(dim) if torch.equal(jacobian[row].abs(), jacobian[row].abs().round())
    ]
    assert copies == [], f"outputs {copies} copy an input"


@pytest.mark.parametrize("permutation", ["reverse", "random", "lu"])
def test_realnvp_with_glue_layers_round_trips(permutation):
    flow = pyro_nf.realnvp(4, num_layers=3, hidden_dims=(8,), permutation=permutation, actnorm=True)
    flow.double()
    z = torch.randn(7, 4, dtype=torch.float64)
    transform = flow.transform
    torch.testing.assert_close(transform.inv(transform(z)), z)


@pytest.mark.parametrize("dim", [3, 16])
def test_lu_linear_scales_its_triangular_factors_by_inverse_sqrt_dim(dim):
    """The layer's map is the docstring's W = P (I + A_L / sqrt(D)) (A_U / sqrt(D) +
    diag(e^s)), computed here by hand (the 1 / sqrt(D) keeps a step of every entry from
    moving W by O(D)), and its log-det is log |det W|."""
    torch.manual_seed(0)
    layer = LULinear(dim, permutation="random").double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn_like(parameter))
    scale = dim**-0.5
    lower = torch.eye(dim, dtype=torch.float64) + scale * layer.lower.detach().tril(-1)
    upper = scale * layer.upper.detach().triu(1) + torch.diag(layer.log_diagonal.detach().exp())
    weight = (lower @ upper)[torch.argsort(layer.permutation)]
    z = torch.randn(5, dim, dtype=torch.float64)
    x, log_det = layer.forward_and_log_det(z)
    torch.testing.assert_close(x, z @ weight.T + layer.bias.detach())
    torch.testing.assert_close(log_det, torch.linalg.slogdet(weight)[1].expand(5))


def test_flow_follows_dtype_moves():
    flow = pyro_nf.realnvp(2, num_layers=2, hidden_dims=(8,)).to(torch.float64)
    assert flow().sample((3,)).dtype == torch.float64
    assert flow.log_prob(torch.zeros(3, 2, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dim": 1}, "dim >= 2"),
        ({"dim": 0}, "dim must be an integer >= 1"),
        ({"dim": 3, "num_layers": 0}, "num_layers"),
        ({"dim": 3, "coupling": "quadratic"}, "unknown coupling function"),
        ({"dim": 3, "permutation": "shuffle"}, "unknown permutation"),
    ],
)
def test_realnvp_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pyro_nf.realnvp(**kwargs)


def test_flow_context_errors_name_the_sizes():
    flow = pyro_nf.realnvp(2, context_dim=3, num_layers=2, hidden_dims=(8,))
    with pytest.raises(ValueError, match="conditional"):
        flow()
    with pytest.raises(ValueError, match="3.*4|4.*3"):
        flow(torch.randn(5, 4))
    with pytest.raises(ValueError, match="unconditional"):
        pyro_nf.realnvp(2)(torch.randn(5, 3))


def test_coupling_rejects_degenerate_masks():
    with pytest.raises(ValueError, match="both parts"):
        Coupling(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one-dimensional"):
        Coupling(torch.ones(2, 2, dtype=torch.bool))


def test_fresh_coupling_flow_is_close_to_identity():
    flow = pyro_nf.realnvp(4, num_layers=4)
    z = torch.randn(100, 4)
    x = flow.transform(z)
    # The conditioners' last layers start at 1e-2 of their usual scale, so every layer
    # moves a point by about 1e-2 of its scale; 0.1 allows four layers and 3-sigma inputs.
    assert (x - z).abs().max() < 0.1


def test_realnvp_density_model_beats_gaussian_on_two_moons():
    torch.manual_seed(0)
    data = datasets.two_moons(2000, seed=1)
    train, test = datasets.train_test_split(data, test_fraction=0.25, seed=1)
    flow = pyro_nf.realnvp(2, num_layers=6, hidden_dims=(32, 32))
    losses = fit_with_svi(flow, train, steps=400, batch_size=256, lr=5e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        flow_ll = flow.log_prob(test).mean().item()
    gaussian_ll = gaussian_log_likelihood(train, test)
    # On two moons a converged flow is 0.84 nats above the best Gaussian (-2.46 vs -3.30
    # held out, docs' density table): 400 SVI steps must close at least a third of that.
    assert flow_ll > gaussian_ll + 0.3, (flow_ll, gaussian_ll)


def test_main_job_runs_and_reports_finite_numbers(capsys):
    result = main(["--steps", "30", "--num-samples", "400", "--layers", "2"])
    assert all(torch.isfinite(torch.tensor(list(result.values()))))
    assert "held-out log-likelihood" in capsys.readouterr().out


def test_replacing_a_nested_submodule_or_parameter_invalidates_the_cache():
    layer = pyro_nf.realnvp(2, num_layers=1, hidden_dims=(8,)).layers[0]
    x = torch.randn(5, 2)
    z = layer.inv(x)
    assert layer.inv(x) is z, "an unchanged layer answers from its cache"
    network = layer.conditioner.network
    network[0] = torch.nn.Linear(network[0].in_features, network[0].out_features)
    replaced_module = layer.inv(x)
    assert replaced_module is not z
    torch.testing.assert_close(replaced_module, layer.inverse_and_log_det(x)[0])
    network[2].weight = torch.nn.Parameter(torch.randn_like(network[2].weight))
    replaced_parameter = layer.inv(x)
    assert replaced_parameter is not replaced_module
    torch.testing.assert_close(replaced_parameter, layer.inverse_and_log_det(x)[0])


def test_reprs_say_what_each_layer_is():
    realnvp = repr(pyro_nf.realnvp(4, num_layers=2, hidden_dims=(8,), permutation="reverse"))
    # With a reverse glue layer every layer conditions on the last half (the glue swaps).
    assert "Coupling(dim=4, coupling_function=Affine(" in realnvp and "mask=0011" in realnvp
    assert "Permutation(dim=4, permutation=reverse)" in realnvp
    maf = repr(pyro_nf.maf(4, num_layers=1, hidden_dims=(8, 8), order="reverse").layers[0])
    assert maf.startswith("MaskedAutoregressive(dim=4, coupling_function=Affine(")
    assert "hidden=(8, 8), order=reverse" in maf
    cnf = repr(pyro_nf.cnf(2, hidden_dims=(8,)).layers[0])
    assert cnf.startswith("ContinuousFlow(dim=2, hidden=(8,), trace='exact'")
