"""The contract checker must catch broken transforms, not only pass good ones."""

import pyro
import pytest
import torch

from pyro_nf.testing import NotApplicable, TransformContract
from pyro_nf.transforms import Coupling, PairCache, Permutation, half_mask
from pyro_nf.transforms.coupling_functions import Affine


class WrongSignAffine(Affine):
    """An affine coupling function whose log-derivative has the wrong sign."""

    def forward(self, z, params):
        x, log_derivative = super().forward(z, params)
        return x, -log_derivative

    def inverse(self, x, params):
        z, log_derivative = super().inverse(x, params)
        return z, -log_derivative


class BadInverseAffine(Affine):
    """An affine coupling function whose inverse forgets the shift."""

    def inverse(self, x, params):
        shift, log_scale = self._shift_and_log_scale(params)
        return x * torch.exp(-log_scale), log_scale


class IdentityOnlyCache(PairCache):
    """Pyro's cache: keyed on tensor identity alone, kept across backward passes."""

    def _forget_on_backward(self, tensors):
        pass


class StaleCacheCoupling(Coupling):
    """A coupling layer with Pyro's identity-only cache: stale after a parameter update."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pair_cache = IdentityOnlyCache()

    def _cache_state(self, context):
        return None


def contract(function=None, cls=Coupling):
    return TransformContract(lambda: cls(half_mask(4), function or Affine(), hidden_dims=(8,)), 4)


def test_wrong_log_det_sign_is_caught():
    with pytest.raises(AssertionError, match="log-det"):
        contract(WrongSignAffine()).check_log_det_matches_jacobian()


def test_wrong_inverse_is_caught():
    with pytest.raises(AssertionError, match="z -> x -> z"):
        contract(BadInverseAffine()).check_round_trip()


def test_stale_identity_cache_is_caught():
    with pytest.raises(AssertionError, match="step 1"):
        contract(cls=StaleCacheCoupling).check_fresh_density_with_same_data_tensor()


def test_cache_kept_across_backward_is_caught():
    with pytest.raises((AssertionError, RuntimeError)):
        contract(cls=StaleCacheCoupling).check_backward_twice_without_step()


def test_good_transform_passes_everything():
    contract().check_all()


class ParameterWritingCoupling(Coupling):
    """A coupling layer whose every pass nudges a parameter: a read that writes."""

    def forward_and_log_det(self, z, context=None):
        with torch.no_grad():
            next(self.conditioner.parameters()).add_(1e-6)
        return super().forward_and_log_det(z, context)


class RunningStatisticCoupling(Coupling):
    """A coupling layer that keeps a running mean of its inputs in a buffer on every pass."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("running_mean", torch.zeros(4))

    def inverse_and_log_det(self, x, context=None):
        if x.numel():
            self.running_mean.mul_(0.9).add_(0.1 * x.detach().reshape(-1, 4).mean(0))
        return super().inverse_and_log_det(x, context)


@pytest.mark.parametrize("cls", [ParameterWritingCoupling, RunningStatisticCoupling])
def test_read_that_writes_is_caught(cls):
    with pytest.raises(AssertionError, match="wrote into its state"):
        contract(cls=cls).check_reads_never_write()


def test_check_that_does_not_apply_says_so():
    results = TransformContract(lambda: Permutation.reverse(3), 3).check_all()
    assert results["check_gradients"].startswith("not applicable")
    assert results["check_round_trip"] == "passed"
    with pytest.raises(NotApplicable):
        TransformContract(lambda: Permutation.reverse(3), 3).check_gradients()


def test_contract_leaves_no_trace_even_when_a_check_fails():
    pyro.param("users_own_parameter", torch.ones(2))
    torch.manual_seed(123)
    expected_draw = torch.randn(3)
    torch.manual_seed(123)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(AssertionError):
            contract(WrongSignAffine()).check_log_det_matches_jacobian()
        contract().check_svi_steps()
        contract().check_double_under_float32_default()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous_dtype)
    assert list(pyro.get_param_store().keys()) == ["users_own_parameter"]
    assert torch.equal(torch.randn(3).to(expected_draw), expected_draw), "the RNG moved"
