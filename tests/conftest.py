import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--device", default=None, help="run the contract checks on this device (e.g. cuda)"
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seed_and_clear_param_store():
    import pyro

    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


def pytest_configure(config):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    # The tests' tensors are small: one thread is as fast, and on a shared machine it
    # avoids the stalls of oversubscribed OpenMP threads.
    torch.set_num_threads(int(os.environ.get("PYRO_NF_TEST_THREADS", "1")))
