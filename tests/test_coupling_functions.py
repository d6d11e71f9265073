"""The rational-quadratic spline's tails, knots and parameter layout.

The contract suite (tests/test_contract.py) checks the spline inside full layers; these
tests check the elementwise function itself where layers rarely look: at the knots, in
the tails, and far outside the interval.
"""

import pytest
import torch

from pyro_nf.transforms.coupling_functions import RationalQuadraticSpline, coupling_function

TAILS = ("linear", "identity")


def random_params(spline: RationalQuadraticSpline, shape: tuple[int, ...], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, spline.num_params, generator=generator, dtype=torch.float64)


def derivative(spline: RationalQuadraticSpline, z, params):
    """dx/dz by autograd (each x_i depends on z_i only)."""
    z = z.clone().requires_grad_(True)
    x, _ = spline.forward(z, params)
    (grad,) = torch.autograd.grad(x.sum(), z)
    return grad


@pytest.mark.parametrize("tails", TAILS)
def test_zero_parameters_give_the_identity_inside_and_outside(tails):
    spline = RationalQuadraticSpline(num_bins=6, bound=2.0, tails=tails)
    z = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    x, log_derivative = spline.forward(z, torch.zeros(z.shape + (spline.num_params,)))
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(log_derivative, torch.zeros_like(z))


@pytest.mark.parametrize("tails", TAILS)
def test_log_derivative_matches_autograd_inside_and_in_the_tails(tails):
    spline = RationalQuadraticSpline(num_bins=5, bound=2.0, tails=tails)
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    params = random_params(spline, (1,)).expand(z.shape + (spline.num_params,))
    _, log_derivative = spline.forward(z, params)
    torch.testing.assert_close(log_derivative, derivative(spline, z, params).log())
    _, log_derivative_inverse = spline.inverse(spline.forward(z, params)[0], params)
    torch.testing.assert_close(log_derivative_inverse, log_derivative)


@pytest.mark.parametrize("tails", TAILS)
@pytest.mark.parametrize("seed", range(3))
def test_value_and_derivative_are_continuous_at_every_knot(tails, seed):
    spline = RationalQuadraticSpline(num_bins=5, bound=2.0, tails=tails)
    params = random_params(spline, (), seed)
    knots = spline._spline(params)[0]
    # One-sided points at distance eps: a smooth join changes value and log-derivative
    # by eps times a slope below 1e4 (bins are at least 1e-3 * 2B wide), under 1e-6;
    # a wrong join (a tail slope that is not the boundary derivative) jumps by O(0.1).
    eps = 1e-10
    left, right = knots - eps, knots + eps
    expand = params.expand(knots.shape + params.shape)
    x_left, log_left = spline.forward(left, expand)
    x_right, log_right = spline.forward(right, expand)
    torch.testing.assert_close(x_left, x_right, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_left, log_right, atol=1e-6, rtol=0)
    torch.testing.assert_close(spline.forward(knots, expand)[0][[0, -1]], knots[[0, -1]])


@pytest.mark.parametrize("tails", TAILS)
def test_strictly_increasing_over_a_wide_range(tails):
    spline = RationalQuadraticSpline(num_bins=8, bound=3.0, tails=tails)
    z = torch.linspace(-100, 100, 20001, dtype=torch.float64)
    params = random_params(spline, (4, 1), seed=1).expand(4, z.numel(), spline.num_params)
    x, log_derivative = spline.forward(z.expand(4, -1), params)
    assert bool((x.diff(dim=-1) > 0).all())
    assert bool(torch.isfinite(log_derivative).all())


def test_linear_tails_are_straight_lines_with_the_boundary_slopes():
    spline = RationalQuadraticSpline(num_bins=4, bound=1.5, tails="linear")
    params = random_params(spline, (), seed=2)
    derivatives = spline._spline(params)[4]
    z = torch.tensor([-40.0, -3.0, -1.5, 1.5, 3.0, 40.0], dtype=torch.float64)
    x, log_derivative = spline.forward(z, params.expand(6, -1))
    slopes = torch.stack([derivatives[0]] * 3 + [derivatives[-1]] * 3)
    edges = torch.tensor([-1.5] * 3 + [1.5] * 3, dtype=torch.float64)
    torch.testing.assert_close(x, edges + slopes * (z - edges))
    torch.testing.assert_close(log_derivative, slopes.log())
    # The tails carry information: their slopes differ from 1 for random parameters.
    assert float((slopes - 1).abs().min()) > 1e-3


def test_identity_tails_leave_the_outside_unchanged():
    spline = RationalQuadraticSpline(num_bins=4, bound=1.5, tails="identity")
    z = torch.tensor([-40.0, -1.5, 1.5, 3.0], dtype=torch.float64)
    x, log_derivative = spline.forward(z, random_params(spline, (4,), seed=3))
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(log_derivative, torch.zeros_like(z))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tails", TAILS)
def test_round_trip_far_outside_the_interval(tails, dtype):
    spline = RationalQuadraticSpline(num_bins=8, bound=3.0, tails=tails)
    z = torch.tensor([-1e3, -1e2, -3.5, -3.0, 0.0, 2.9, 3.0, 1e2, 1e3], dtype=dtype)
    params = random_params(spline, (z.numel(),), seed=4).to(dtype)
    x, log_forward = spline.forward(z, params)
    z_back, log_inverse = spline.inverse(x, params)
    # float32 carries 7 digits: at |z| = 1e3 the round trip is good to about 1e-4.
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(z_back, z, **tolerance)
    torch.testing.assert_close(log_inverse, log_forward, **tolerance)
    x_back, _ = spline.forward(spline.inverse(z, params)[0], params)
    torch.testing.assert_close(x_back, z, **tolerance)


def test_gradients_reach_the_tail_slopes():
    spline = RationalQuadraticSpline(num_bins=4, bound=1.0, tails="linear")
    params = torch.zeros(2, spline.num_params, dtype=torch.float64, requires_grad=True)
    _, log_derivative = spline.inverse(torch.tensor([-5.0, 5.0], dtype=torch.float64), params)
    log_derivative.sum().backward()
    # The last K + 1 parameters are the derivatives; the first and last are the tails.
    assert float(params.grad[0, 2 * 4].abs()) > 0
    assert float(params.grad[1, -1].abs()) > 0


def test_parameter_count_and_bad_options():
    assert RationalQuadraticSpline(num_bins=8, tails="linear").num_params == 25
    assert RationalQuadraticSpline().num_params == 49  # 16 bins, linear tails
    assert RationalQuadraticSpline(num_bins=8, tails="identity").num_params == 23
    with pytest.raises(ValueError, match="tails must be"):
        RationalQuadraticSpline(tails="quadratic")
    with pytest.raises(ValueError, match="num_bins"):
        RationalQuadraticSpline(num_bins=0)
    with pytest.raises(ValueError, match="bound"):
        RationalQuadraticSpline(bound=0.0)
    spline = coupling_function("spline", num_bins=4, tails="identity")
    assert isinstance(spline, RationalQuadraticSpline) and spline.tails == "identity"
