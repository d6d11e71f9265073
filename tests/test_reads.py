"""A read never writes, seen from the user's side: the reported reproducer, and a trained
guide of every family evaluated the ways Pyro evaluates guides."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

import pyro_nf
from pyro_nf.flows import FLOW_BUILDERS


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def _changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [
        name for name, value in module.state_dict().items() if not torch.equal(value, before[name])
    ]


@pytest.mark.parametrize("family", list(FLOW_BUILDERS))
def test_the_reported_reproducer_leaves_every_flow_unchanged(family):
    flow = FLOW_BUILDERS[family](3, num_layers=2, hidden_dims=(16,))
    before = _snapshot(flow)
    flow.sample()
    flow.sample((1,))
    with torch.no_grad():
        flow.log_prob(torch.randn(3))
        flow.log_prob(torch.randn(1, 3))
    assert _changed(flow, before) == []


def banana(data=None):
    x = pyro.sample("x", dist.Normal(0.0, 2.0))
    pyro.sample("y", dist.Normal(0.5 * x**2, 0.5))


def train_then_read(model, guide, steps: int) -> None:
    """Train a few SVI steps, then evaluate the guide the ways Pyro evaluates guides
    (losses, Predictive, PSIS): no parameter, buffer or param-store value may move."""
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step()
    before = _snapshot(guide)
    store_before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    losses = [Trace_ELBO().loss(model, guide) for _ in range(3)]
    losses.append(svi.evaluate_loss())
    Predictive(model, guide=guide, num_samples=50)()
    pyro_nf.psis_diagnostic(model, guide, num_samples=64)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert _changed(guide, before) == []
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), store_before[name]), f"{name} moved"


@pytest.mark.parametrize("family", list(FLOW_BUILDERS))
def test_evaluating_a_trained_guide_changes_nothing(family):
    options = {"hidden_dims": (16,)} if family == "cnf" else {"num_layers": 2, "hidden_dims": (16,)}
    train_then_read(banana, pyro_nf.AutoFlow(banana, flow=family, **options), steps=5)


def wide_normal(data=None):
    # 17 latents: above GUIDE_SMALL_MAX_DIM, where every family's guide trains with the
    # path gradient, whose log_prob runs the flow's inverse with detached parameters.
    pyro.sample("z", dist.Normal(torch.zeros(17), 1.0).to_event(1))


@pytest.mark.parametrize("family", list(FLOW_BUILDERS))
def test_evaluating_a_trained_path_gradient_guide_changes_nothing(family):
    options = {"hidden_dims": (8,)} if family == "cnf" else {"num_layers": 2, "hidden_dims": (40,)}
    guide = pyro_nf.AutoFlow(wide_normal, flow=family, **options)
    guide()
    assert isinstance(guide.get_posterior(), pyro_nf.infer.PathDerivativeDistribution)
    train_then_read(wide_normal, guide, steps=3)


@pytest.mark.parametrize("family", ["realnvp", "maf", "iaf"])
def test_training_steps_keep_no_batch_alive(family):
    """The pair cache's backward hooks must not hold the cached tensors: a cycle through
    the autograd graph would keep every step's batch alive (about 10 MB a step at 65,536
    rows before the fix)."""
    import gc

    flow = FLOW_BUILDERS[family](2, num_layers=2, hidden_dims=(8,))
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    rows = 123  # a batch size no other live tensor has

    def live_batch_tensors() -> int:
        gc.collect()
        return sum(
            1
            for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor) and obj.dim() and obj.shape[0] == rows
        )

    counts = []
    for _ in range(12):
        optimizer.zero_grad()
        (-flow.log_prob(torch.randn(rows, 2)).mean()).backward()
        optimizer.step()
        counts.append(live_batch_tensors())
    # The last step's cache may keep its own batch: the input, and per layer its cached
    # (z, x, log_det), at most 1 + 2 * 3 = 7 tensors of that size (10 leaves room for an
    # optimizer view); before the fix the count grew by about 5 a step (65 after 13).
    assert counts[-1] <= counts[0] <= 10, counts
