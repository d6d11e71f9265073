"""Smoke tests of the speed benchmarks' ``--quick`` modes: every row and column runs.

The figures themselves are never asserted (a shared machine cannot time reliably);
these tests check that each benchmark still builds every column and reports a ratio
for every row, so the commands in docs/benchmarks/performance.md keep working.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
from scripts import ROOT, load_script

pytest.importorskip("zuko")


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def quick_results(monkeypatch, tmp_path, script, arguments):
    """Run ``benchmarks/<script>.py --quick`` with ``arguments``; its JSON results."""
    module = load_script(f"benchmarks/{script}.py", f"benchmark_{script}")
    output = tmp_path / f"{script}.json"
    argv = [module.__file__, "--quick", *arguments, "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    return json.loads(output.read_text())


def test_limit_quick_mode_reports_every_row_against_the_limit_and_both_peers(
    benchmarks_on_path, monkeypatch, tmp_path
):
    results = quick_results(monkeypatch, tmp_path, "limit", ["--rounds", "2"])
    expected = {
        f"{family} {row} D=4"
        for family, rows in {
            "realnvp": ("log_prob", "sample", "train step"),
            "maf": ("log_prob", "sample", "train step"),
            "iaf": ("rsample+log_prob", "train step"),
        }.items()
        for row in rows
    }
    assert set(results) == expected
    for label, row in results.items():
        assert set(row["ms"]) == {"limit", "pyro-nf", "pyro", "zuko"}, label
        assert all(math.isfinite(ms) and ms > 0 for ms in row["ms"].values()), label
        low, high = row["x_limit_range"]
        assert 0 < low <= high, label
        assert row["best_peer"] in ("pyro", "zuko")


def test_svi_steps_quick_mode_times_autoflow_beside_pyros_guides(
    benchmarks_on_path, monkeypatch, tmp_path
):
    results = quick_results(monkeypatch, tmp_path, "svi_steps", ["--rounds", "1"])
    assert set(results) == {f"{family} D={dim}" for family in ("iaf", "realnvp") for dim in (2, 3)}
    for label, row in results.items():
        ours = [name for name in row["ms"] if name.startswith("AutoFlow")]
        assert ours and set(row["ratios"]) == set(ours), label
        for ratio in row["ratios"].values():
            assert ratio["fastest_pyro"] in row["ms"] and ratio["fastest_pyro"] not in ours
            assert math.isfinite(ratio["x_fastest_pyro"]) and ratio["x_fastest_pyro"] > 0


def test_cnf_guide_draw_quick_mode_times_both_draws_of_one_guide(
    benchmarks_on_path, monkeypatch, tmp_path
):
    from pyro_nf.infer import PathDerivativeDistribution

    state_only_rsample = PathDerivativeDistribution.rsample
    results = quick_results(monkeypatch, tmp_path, "cnf_guide_draw", ["--rounds", "1"])
    assert set(results) == {"banana"}
    row = results["banana"]
    assert set(row["ms"]) == {"state-only draw", "augmented draw (before)"}
    assert all(math.isfinite(ms) and ms > 0 for ms in row["ms"].values())
    low, high = row["range"]
    assert 0 < low <= row["ratio"] <= high
    # The emulated old draw is put back: the guide's own draw is the state-only one.
    assert PathDerivativeDistribution.rsample is state_only_rsample
