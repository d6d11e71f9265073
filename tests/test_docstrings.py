"""The docstrings' examples run, and every transform's docstring states its direction."""

import doctest
import importlib
import inspect
import pkgutil

import pyro
import pytest
import torch

import pyro_nf
from pyro_nf.transforms.base import FlowTransform

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(pyro_nf.__path__, prefix="pyro_nf.")
    if not name.endswith("__main__")
)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    globs = {"torch": torch, "pyro": pyro, "pyro_nf": pyro_nf, **vars(module)}
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name, globs=globs):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{module_name} has no runnable example in its docstrings"
    assert results.failed == 0, f"{results.failed} doctest example(s) failed in {module_name}"


def _transform_classes():
    classes = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, FlowTransform)
                and cls is not FlowTransform
                and cls.__module__.startswith("pyro_nf")
            ):
                classes.add(cls)
    return sorted(classes, key=lambda cls: cls.__name__)


@pytest.mark.parametrize("cls", _transform_classes(), ids=lambda cls: cls.__name__)
def test_transform_docstring_states_direction_and_example(cls):
    doc = inspect.getdoc(cls) or ""
    assert "z -> x" in doc or "Direction" in doc, f"{cls.__name__} does not state its direction"
    assert ">>>" in doc, f"{cls.__name__} has no example"
