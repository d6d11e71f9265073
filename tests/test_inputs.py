"""A defined answer for every input, identical across the four families.

One test per row of the input table in ``docs/inputs.md``, parametrized over
:data:`pyro_nf.flows.FLOW_BUILDERS`.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from pyro_nf.flows import FLOW_BUILDERS

FAMILIES = list(FLOW_BUILDERS)
DIM = 3
SMALL = {
    "realnvp": {"num_layers": 2, "hidden_dims": (8,)},
    "maf": {"num_layers": 2, "hidden_dims": (8,)},
    "iaf": {"num_layers": 2, "hidden_dims": (8,)},
    "cnf": {"hidden_dims": (8,)},
}


def _flow(family, dim=DIM, **options):
    torch.manual_seed(0)
    return FLOW_BUILDERS[family](dim, **{**SMALL[family], **options})


@pytest.fixture
def no_validation():
    pyro.enable_validation(False)
    yield
    pyro.enable_validation(True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]
)
def test_another_dtype_is_a_type_error_naming_both(family, dtype):
    flow = _flow(family)
    with pytest.raises(TypeError, match=str(dtype)) as error:
        flow.log_prob(torch.zeros(4, DIM, dtype=dtype))
    assert "torch.float32" in str(error.value)
    with pytest.raises(TypeError, match=str(dtype)):
        flow.transform.inv(torch.zeros(4, DIM, dtype=dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_moved_flow_takes_its_new_dtype(family):
    flow = _flow(family).to(torch.float64)
    assert flow.log_prob(torch.zeros(4, DIM, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="float32"):
        flow.log_prob(torch.zeros(4, DIM))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_a_value_error_naming_the_rows(family, bad):
    flow = _flow(family)
    x = torch.zeros(5, DIM)
    x[3, 1] = bad
    with pytest.raises(ValueError, match=r"1 of 5 rows.*index \(3,\)"):
        flow.log_prob(x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("column", range(DIM))
def test_without_validation_non_finite_rows_alone_are_nan_or_minus_inf(
    family, column, no_validation
):
    flow = _flow(family)
    x = torch.randn(5, DIM)
    x[1, column] = float("inf")
    x[3, column] = float("nan")
    log_prob = flow.log_prob(x)
    assert log_prob.shape == (5,)
    assert log_prob[1] == -float("inf"), "an infinite x has zero density"
    assert torch.isnan(log_prob[3])
    finite_rows = [0, 2, 4]
    # Each finite row gets the value it gets on its own (a row-coupled solver would not).
    # 1e-4: the CNF's adaptive solver (rtol 1e-5) takes other steps for another batch,
    # and float32 sums differ in the last digits; the other families agree to 1e-7.
    torch.testing.assert_close(
        log_prob[finite_rows], flow.log_prob(x[finite_rows]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("context_dim", [0, 2])
def test_empty_batches_give_empty_results_in_both_directions(family, context_dim):
    flow = _flow(family, context_dim=context_dim)
    context = torch.randn(context_dim) if context_dim else None
    empty = torch.zeros(0, DIM)
    assert flow.log_prob(empty, context=context).shape == (0,)
    assert flow.sample((0,), context=context).shape == (0, DIM)
    assert flow.rsample((0,), context=context).shape == (0, DIM)
    assert flow.sample((0, 4), context=context).shape == (0, 4, DIM)
    transform = flow.transform if context is None else flow.transform.condition(context)
    assert transform(empty).shape == (0, DIM)
    assert transform.inv(empty).shape == (0, DIM)


@pytest.mark.parametrize("family", FAMILIES)
def test_numpy_integers_are_integers(family):
    flow = FLOW_BUILDERS[family](np.int64(DIM), **SMALL[family], context_dim=np.int32(2))
    assert flow.dim == DIM and flow.context_dim == 2
    assert isinstance(flow.dim, int)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "hidden_dims, error, words",
    [
        ((0,), ValueError, "hidden_dims"),
        ((8, -1), ValueError, "hidden_dims"),
        (16, TypeError, "sequence"),
        ((8.0,), TypeError, "hidden_dims"),
    ],
    ids=["zero", "negative", "bare-int", "float"],
)
def test_bad_hidden_sizes_are_clear_errors(family, hidden_dims, error, words):
    options = {**SMALL[family], "hidden_dims": hidden_dims}
    with pytest.raises(error, match=words):
        FLOW_BUILDERS[family](DIM, **options)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_errors(family):
    flow = _flow(family, context_dim=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        flow([0.0, 1.0])
    with pytest.raises(ValueError, match="last dimension 2, got shape \\(5, 3\\)"):
        flow(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="conditional"):
        flow.log_prob(torch.zeros(4, DIM))
    with pytest.raises(ValueError, match="unconditional"):
        _flow(family).log_prob(torch.zeros(4, DIM), context=torch.zeros(4, 2))
