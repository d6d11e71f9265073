"""Every registered transform through every contract check."""

import pytest
import torch
from cases import CASES

from pyro_nf.testing import CONTRACT_CHECKS


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("case", list(CASES))
def test_contract(case, check):
    getattr(CASES[case], check)()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", list(CASES))
def test_contract_on_cuda(case):
    CASES[case].check_device("cuda")
