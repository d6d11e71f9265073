"""Flows with a Student-t base (``base="student_t"``): density, learning, moves, reads."""

from __future__ import annotations

import io

import pyro.distributions as dist
import pytest
import torch

import pyro_nf
from pyro_nf.flows import FLOW_BASES, FLOW_STUDENT_T_INIT_DF, FLOW_STUDENT_T_MAX_DF, Flow

BUILDERS = {
    "realnvp": lambda **kw: pyro_nf.realnvp(3, num_layers=2, hidden_dims=(8,), **kw),
    "spline coupling": lambda **kw: pyro_nf.realnvp(
        3, num_layers=2, hidden_dims=(8,), coupling_function="spline", **kw
    ),
    "maf": lambda **kw: pyro_nf.maf(3, num_layers=2, hidden_dims=(8,), **kw),
    "iaf": lambda **kw: pyro_nf.iaf(3, num_layers=2, hidden_dims=(8,), **kw),
    "cnf": lambda **kw: pyro_nf.cnf(3, hidden_dims=(8,), rtol=1e-8, atol=1e-8, **kw),
}


def perturbed(flow: Flow, seed: int = 0) -> Flow:
    """The flow with every parameter moved off its initial value (tails included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in flow.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.1 * noise)
    return flow


@pytest.mark.parametrize("family", list(BUILDERS))
def test_log_prob_is_the_change_of_variables_with_student_t_coordinates(family):
    flow = perturbed(BUILDERS[family](base="student_t")).double()
    x = torch.randn(6, 3, dtype=torch.float64) * 3
    z = flow.transform.inv(x)
    df = 1 / (flow.base_tail.abs() + 1 / FLOW_STUDENT_T_MAX_DF)
    base = dist.StudentT(df, torch.zeros(3, dtype=torch.float64), 1.0).log_prob(z).sum(-1)
    expected = base - flow.transform.log_abs_det_jacobian(z, x)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-7, atol=1e-7)
    normal = dist.Normal(0.0, torch.ones(3, dtype=torch.float64)).log_prob(z).sum(-1)
    assert not torch.allclose(expected, normal - flow.transform.log_abs_det_jacobian(z, x))


@pytest.mark.parametrize("family", list(BUILDERS))
def test_own_draws_score_like_the_draw_and_reach_the_tail_parameter(family):
    flow = perturbed(BUILDERS[family](base="student_t")).double()
    x, log_p = flow().rsample_and_log_prob((5,))
    torch.testing.assert_close(log_p, flow.log_prob(x), rtol=1e-6, atol=1e-6)
    (x.sum() + log_p.sum()).backward()
    assert flow.base_tail.grad is not None and bool(flow.base_tail.grad.abs().sum() > 0)


def test_the_base_starts_at_ten_degrees_of_freedom_and_a_normal_flow_has_no_tail():
    flow = pyro_nf.realnvp(2, base="student_t")
    torch.testing.assert_close(flow.base_df, torch.full((2,), FLOW_STUDENT_T_INIT_DF))
    assert "base_tail" in flow.state_dict()
    normal = pyro_nf.realnvp(2)
    assert normal.base == "normal" and normal.base_df is None
    assert not any("base_tail" in name for name in normal.state_dict())
    assert "base='student_t'" in repr(flow) and "base=" not in repr(normal)


def test_the_degrees_of_freedom_stay_in_their_range():
    flow = Flow([], 2, base="student_t")
    with torch.no_grad():
        flow.base_tail.copy_(torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(flow.base_df, torch.tensor([FLOW_STUDENT_T_MAX_DF, 1 / 0.501]))


def fitted_base_df(data: torch.Tensor, steps: int) -> torch.Tensor:
    """The degrees of freedom of a Student-t base alone (no layers) fitted to ``data`` by
    maximum likelihood (Adam, lr 1e-2, full batch)."""
    flow = Flow([], data.shape[-1], base="student_t")
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        (-flow.log_prob(data).mean()).backward()
        optimizer.step()
    return flow.base_df.detach()


def test_the_tail_index_is_learned_from_heavy_tailed_data():
    # 20,000 draws of Student-t(3) coordinates. The MLE of the degrees of freedom has a
    # standard error of about 0.1 here, so |df - 3| < 0.5 fails only if the tail does
    # not learn (it starts at 10) or learns the wrong quantity.
    torch.manual_seed(0)
    data = dist.StudentT(3.0, torch.zeros(2), torch.ones(2)).sample((20_000,))
    df = fitted_base_df(data, steps=500)
    assert torch.all((df - 3.0).abs() < 0.5), df


def test_normal_data_drives_the_tails_light():
    # On standard normal data the likelihood rises with the degrees of freedom: the
    # fitted base must end far lighter-tailed than its start (10). Near the floor of the
    # tail index Adam's steps of about 0.01 keep df above 1 / 0.011 = 90.
    torch.manual_seed(1)
    df = fitted_base_df(torch.randn(20_000, 2), steps=300)
    assert torch.all(df > 30.0), df


@pytest.mark.parametrize("family", ["realnvp", "maf"])
def test_state_dict_round_trip_keeps_the_tails(family):
    flow = perturbed(BUILDERS[family](base="student_t"))
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    fresh = BUILDERS[family](base="student_t")
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(7, 3) * 4
    torch.testing.assert_close(fresh.log_prob(x), flow.log_prob(x))
    torch.testing.assert_close(fresh.base_df, flow.base_df)
    with pytest.raises(RuntimeError, match="base_tail"):
        BUILDERS[family]().load_state_dict(flow.state_dict())


def test_reads_leave_the_tails_and_every_parameter_unchanged():
    flow = perturbed(BUILDERS["realnvp"](base="student_t"))
    before = {name: value.clone() for name, value in flow.state_dict().items()}
    flow().sample((10,))
    flow.log_prob(torch.randn(4, 3))
    flow().rsample_and_log_prob((3,))
    for name, value in flow.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_dtype_moves_carry_the_tails():
    flow = pyro_nf.maf(2, num_layers=1, hidden_dims=(8,), base="student_t").double()
    assert flow.base_tail.dtype == torch.float64
    x = flow().sample((3,))
    assert x.dtype == torch.float64 and flow.log_prob(x).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_moves_carry_the_tails():
    flow = pyro_nf.realnvp(2, hidden_dims=(8,), base="student_t").cuda()
    x = flow().rsample((4,))
    assert x.is_cuda and flow.log_prob(x).is_cuda and flow.base_df.is_cuda


def test_conditional_flow_with_student_t_base():
    flow = pyro_nf.realnvp(2, hidden_dims=(8,), context_dim=3, base="student_t")
    context = torch.randn(5, 3)
    x = flow(context).sample()
    assert x.shape == (5, 2) and flow.log_prob(x, context).shape == (5,)


@pytest.mark.parametrize("builder", [pyro_nf.realnvp, pyro_nf.maf, pyro_nf.iaf, pyro_nf.cnf])
def test_an_unknown_base_is_an_error_that_names_the_choices(builder, monkeypatch):
    def no_layer(*args, **kwargs):
        raise AssertionError("a layer was built before the base was checked")

    for name in ("Coupling", "MaskedAutoregressive", "InverseAutoregressive", "ContinuousFlow"):
        monkeypatch.setattr(pyro_nf.flows, name, no_layer)
    with pytest.raises(ValueError, match="student_t"):
        builder(2, base="cauchy")
    with pytest.raises(ValueError, match="student_t"):
        Flow([], 2, base="cauchy")
    assert FLOW_BASES == ("normal", "student_t")


def test_fit_trains_the_tails():
    # Data with 2.5 degrees of freedom, far heavier than the base's start (10): any
    # training of the tail index lowers the degrees of freedom of both coordinates.
    torch.manual_seed(0)
    data = dist.StudentT(2.5, torch.zeros(2), torch.ones(2)).sample((2000,))
    flow = pyro_nf.realnvp(2, num_layers=2, hidden_dims=(8,), base="student_t")
    before = flow.base_df.detach().clone()
    pyro_nf.fit(flow, data, epochs=5, batch_size=256, lr=1e-2, patience=None, progress=False)
    assert torch.all(flow.base_df < before), flow.base_df
