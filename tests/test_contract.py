"""Every registered transform through every contract check.

``python -m pytest --device cuda`` runs the same checks on a GPU; without the option
they run on the CPU, and the CUDA variant runs by itself when a GPU is present.
"""

import dataclasses

import pytest
import torch
from cases import CASES

from pyro_nf.testing import CONTRACT_CHECKS, NotApplicable


def run_check(contract, check, *args):
    """Run one check; a check that does not apply to the case is reported as a skip."""
    try:
        getattr(contract, check)(*args)
    except NotApplicable as reason:
        pytest.skip(f"not applicable: {reason}")


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("case", list(CASES))
def test_contract(case, check, request):
    device = request.config.getoption("--device") or "cpu"
    run_check(dataclasses.replace(CASES[case], device=device), check)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("case", list(CASES))
def test_contract_on_cuda(case, check):
    contract = dataclasses.replace(CASES[case], device="cuda")
    contract.check_device("cuda")
    run_check(contract, check)
