"""Soak: every family trains for 10,000 steps at its default settings without trouble.

The procedure is :func:`soak` of ``benchmarks/guides.py`` (``--soak`` there prints the
same checks as a table): the banana and the funnel with an ``AutoFlow`` guide, and a
density task (two moons). It passes when no loss is non-finite and no evaluation
(single-draw ELBO under ``no_grad``, ``Predictive``, sampling, scoring in train and
eval mode) changed a parameter or buffer. The 10,000-step runs are slow-marked (about
an hour on one CPU core for all twelve, most of it the ODE family); a few steps of the
same procedure run in the fast suite so that the code stays working.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scripts import load_script

from pyro_nf.flows import FLOW_BUILDERS

ROOT = Path(__file__).resolve().parents[1]


def load_guides_benchmark():
    return load_script("benchmarks/guides.py", "benchmark_guides")


TASKS = ("banana", "funnel", "density")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", list(FLOW_BUILDERS))
def test_soak_procedure_runs(family, task):
    result = load_guides_benchmark().soak(family, task, steps=3, check_every=2)
    assert result.first_non_finite is None
    assert result.drift == []


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("family", list(FLOW_BUILDERS))
def test_soak_ten_thousand_steps(family, task):
    result = load_guides_benchmark().soak(family, task, steps=10_000, check_every=1000)
    assert result.first_non_finite is None, f"non-finite loss at step {result.first_non_finite}"
    assert result.drift == [], result.drift[:5]
