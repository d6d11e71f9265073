"""torch.compile: whole-graph capture of the coupling and autoregressive families, and no
graph break in the package's own code for the continuous one.

The tests compile with the ``aot_eager`` backend: it runs dynamo's capture and AOT
autograd (where graph breaks and tracing failures show) without the minutes of code
generation of the default backend, and its values equal eager's.
"""

from __future__ import annotations

import pytest
import torch

from pyro_nf.flows import FLOW_BUILDERS

DIM = 4
SMALL = {"num_layers": 2, "hidden_dims": (16,)}
# Capture takes seconds per graph (tens for a spline flow or an unrolled sequential
# pass): the affine case of each family runs in the fast suite, the rest with --runslow.
CAPTURED_WHOLE = [
    pytest.param(
        family,
        function,
        id=f"{family}-{function}",
        marks=() if function == "affine" else pytest.mark.slow,
    )
    for family in ("realnvp", "maf", "iaf")
    for function in ("affine", "spline")
]


def _flow(family: str, function: str = "affine"):
    torch.manual_seed(0)
    return FLOW_BUILDERS[family](DIM, coupling_function=function, **SMALL)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family, function", CAPTURED_WHOLE)
def test_log_prob_compiles_to_one_graph_with_eager_values_and_gradients(family, function):
    flow = _flow(family, function)
    data = torch.randn(64, DIM)

    def loss(x):
        return -flow.log_prob(x).mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    eager_value = loss(data)
    eager_grads = torch.autograd.grad(eager_value, list(flow.parameters()))
    compiled_value = compiled(data)
    compiled_grads = torch.autograd.grad(compiled_value, list(flow.parameters()))
    torch.testing.assert_close(compiled_value, eager_value)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize(
    "family, function",
    [
        pytest.param(family, function, id=f"{family}-{function}", marks=marks)
        for family, function, marks in [
            ("iaf", "affine", ()),  # the variational pattern's family runs in the fast suite
            ("iaf", "spline", pytest.mark.slow),
            ("maf", "affine", pytest.mark.slow),
            ("realnvp", "affine", pytest.mark.slow),
        ]
    ],
)
def test_rsample_and_log_prob_compile_to_one_graph(family, function):
    """The variational pattern: under compile the pair cache is off, so the log-density
    of the flow's own draws is one fresh x -> z pass (sequential for the IAF), and equals
    eager's cached value up to that pass's float32 round trip."""
    flow = _flow(family, function)

    def draw_and_score():
        x = flow.rsample((32,))
        return x, flow.log_prob(x)

    _draws_and_scores_compiled_as_eager(draw_and_score, rtol=1e-4, atol=1e-4)


def _draws_and_scores_compiled_as_eager(draw_and_score, **tolerances):
    """Compile ``draw_and_score`` whole; the same draws (same seed) and scores as eager.

    Returns eager's ``(x, log_prob)``."""
    compiled = torch.compile(draw_and_score, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    x_eager, log_prob_eager = draw_and_score()
    torch.manual_seed(1)
    x_compiled, log_prob_compiled = compiled()
    torch.testing.assert_close(x_compiled, x_eager)
    torch.testing.assert_close(log_prob_compiled, log_prob_eager, **tolerances)
    return x_eager, log_prob_eager


@pytest.mark.parametrize("family", ["iaf", "maf", "realnvp"])
def test_rsample_and_log_prob_compiles_to_one_graph_of_one_pass_per_layer(family):
    """``rsample_and_log_prob`` needs no cache: compiled, the IAF's variational pattern
    stays one pass per layer (not its sequential inverse), with eager's values."""
    flow = _flow(family)

    x, log_prob = _draws_and_scores_compiled_as_eager(lambda: flow.rsample_and_log_prob((32,)))
    torch.testing.assert_close(log_prob, flow.log_prob(x))


@pytest.mark.parametrize("family", ["iaf", "maf", "realnvp"])
def test_without_the_cache_log_prob_and_rsample_and_log_prob_run_one_pass_per_layer(
    family, monkeypatch
):
    """What a compiled call does (the cache is off under compile): in the cheap
    direction of each family every conditioner runs once per ``log_prob`` (x -> z) and
    once per ``rsample_and_log_prob`` (z -> x). Before, ``log_prob`` ran each
    conditioner a second time for the log-determinant. (The sequential directions, MAF
    sampling and the IAF's inverse, evaluate the network position by position and are
    not counted here.)"""
    flow = _flow(family)
    layers = [layer for layer in flow.layers if hasattr(layer, "conditioner")]
    calls = []
    for layer in layers:
        layer._cache_size = 0
        monkeypatch.setattr(
            layer.conditioner, "forward", _counting(layer.conditioner.forward, calls)
        )
    with torch.no_grad():
        if family != "maf":
            flow.rsample_and_log_prob((8,))
            assert len(calls) == len(layers)
        if family != "iaf":
            calls.clear()
            flow.log_prob(torch.randn(8, DIM))
            assert len(calls) == len(layers)


def _counting(forward, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return counted


def _breaks_in_package_code(function, *args) -> list[str]:
    explanation = torch._dynamo.explain(function)(*args)
    found = []
    for graph_break in explanation.break_reasons:
        frames = list(graph_break.user_stack)
        if frames and "pyro_nf" in frames[-1].filename:
            found.append(f"{frames[-1].filename}:{frames[-1].lineno}: {graph_break.reason}")
    return found


@pytest.mark.slow
def test_continuous_flow_breaks_graphs_only_inside_the_solver():
    """The adaptive solver's step control is data-dependent (torchdiffeq), so the graph
    breaks there; none of the breaks is in the package's own code once dynamo may trace
    ``torch.autograd.grad`` (the exact trace needs it)."""
    flow = FLOW_BUILDERS["cnf"](2, hidden_dims=(8,), rtol=1e-4, atol=1e-4)
    data = torch.randn(16, 2)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        breaks = _breaks_in_package_code(lambda x: flow.log_prob(x), data)
    assert not breaks, breaks
