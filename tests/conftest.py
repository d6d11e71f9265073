import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests: a few derandomized examples per test in the default run (the
# suite's time budget), many more with ``--hypothesis-profile=long``.
_hypothesis_common = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("fast", max_examples=6, derandomize=True, **_hypothesis_common)
settings.register_profile("long", max_examples=300, **_hypothesis_common)
settings.load_profile("fast")


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


# The example and benchmark scripts import their folder's helper modules by bare name
# (``from common import ...``, ``from timing import ...``) after putting the folder on
# sys.path. Python keeps one ``sys.modules`` entry per name, so a helper loaded by one
# test would be served to another folder's script that uses the same name (the examples'
# and the benchmarks' helpers were both called ``common`` once). Each test gets back the
# entries it started with.
SCRIPT_HELPER_MODULES = ("common", "timing", "coupling", "autoregressive")


@pytest.fixture(autouse=True)
def _isolate_script_helper_modules():
    import sys

    saved = {name: sys.modules.get(name) for name in SCRIPT_HELPER_MODULES}
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
