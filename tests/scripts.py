"""Loading the repository's scripts (examples, benchmarks) as modules in the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str, module_name: str) -> ModuleType:
    """The script at ``ROOT / path`` imported once as the module ``module_name``."""
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[module_name]
