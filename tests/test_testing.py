"""The contract checker must catch broken transforms, not only pass good ones."""

import pytest
import torch

from pyro_nf.testing import TransformContract
from pyro_nf.transforms import Coupling, PairCache, half_mask
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
