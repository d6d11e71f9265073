"""Smoke tests of benchmarks/amortized.py and benchmarks/cnf_work.py (``--quick`` modes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scripts import load_script

pytest.importorskip("zuko")


def load_amortized():
    return load_script("benchmarks/amortized.py", "benchmark_amortized")


def load_cnf_work():
    return load_script("benchmarks/cnf_work.py", "benchmark_cnf_work")


def test_amortized_quick_mode_scores_every_guide_on_both_tasks(tmp_path):
    suite = load_amortized()
    output = tmp_path / "rows.json"
    result = suite.main(["--quick", "--families", "iaf", "--output", str(output)])
    rows = result["rows"]
    names = list(suite.guide_factories(("iaf",)))
    assert [(row["task"], row["guide"]) for row in rows] == [
        (task, name) for task in suite.TASKS for name in names
    ]
    for row in rows:
        assert math.isfinite(row["elbo"]) and math.isfinite(row["log_q_true"]), row
    conjugate = [row for row in rows if row["task"] == "conjugate"]
    # KL(p || q) and KL(q || p) are Monte Carlo estimates of non-negative numbers; 8
    # draws of an untrained guide put them far above any sampling error's reach of 0.
    assert all(row["kl_pq"] > 0 and row["kl_qp"] > 0 for row in conjugate), conjugate
    assert json.loads(output.read_text())["rows"] == rows
    assert "| AmortizedFlowGuide(iaf) |" in result["table"]


def test_amortized_variant_adds_a_from_site_guide_with_its_options():
    suite = load_amortized()
    result = suite.main(
        ["--quick", "--tasks", "tutorial", "--families", "iaf", "--guides", "amortized Normal"]
        + ["--variant", 'before={"raw_features": false}']
    )
    names = [row["guide"] for row in result["rows"]]
    assert names == ["amortized Normal", "AmortizedFlowGuide.from_site(iaf, before)"]
    default = suite.main(["--quick", "--tasks", "tutorial", "--families", "iaf"])["rows"]
    (plain,) = [r for r in default if r["guide"] == "AmortizedFlowGuide.from_site(iaf)"]
    # Without the raw features the flow and the affine layer take 10 fewer context inputs.
    assert plain["parameters"] > result["rows"][1]["parameters"]


def test_amortized_conjugate_posterior_is_the_closed_form():
    suite = load_amortized()
    task = suite.conjugate_task(groups=4, seed=0)
    x, noise = task.args
    loc, scale = task.posterior
    # One group by hand: precision 1 + n / s^2, mean sum(x) / s^2 / precision.
    precision = 1 + x.shape[1] / noise[0] ** 2
    assert torch.allclose(scale[0], precision.rsqrt().expand(3))
    assert torch.allclose(loc[0], x[0].sum(0) / noise[0] ** 2 / precision)


def test_amortized_unknown_names_are_rejected_before_training():
    suite = load_amortized()
    with pytest.raises(ValueError, match="unknown tasks"):
        suite.main(["--quick", "--tasks", "no_such_task"])
    with pytest.raises(ValueError, match="unknown guides"):
        suite.main(["--quick", "--guides", "no such guide"])


def test_cnf_work_quick_mode_integrates_one_field_in_every_library():
    bench = load_cnf_work()
    (result,) = bench.main(["--quick", "--skip-memory"])
    log_prob = {row["model"]: row for row in result["log_prob"]}
    ours, reference = (
        log_prob["pyro-nf (adjoint, seminorm)"],
        log_prob["torchdiffeq FFJORD (adjoint)"],
    )
    # One field, one solver (torchdiffeq's dopri5), one tolerance: the same steps.
    assert ours["nfe"] == reference["nfe"] > 0
    # rtol = atol = 1e-5 in float32 against a float64 solve at 1e-10: the solver's
    # error on log p is of the order of the tolerance times the integration length and
    # the float32 rounding (1e-7 relative) of a log-density of a few units; 1e-3 leaves
    # room for both while a wrong sign or a missing trace would be off by O(1). zuko
    # controls the log-det's error 100 times more loosely (its trace_scale = 1e-2), so
    # its bar is 100 times wider, still far below an O(1) mistake.
    bars = {"zuko CNF (checkpoint adjoint)": 1e-1}
    for row in result["log_prob"]:
        assert row["max_error"] < bars.get(row["model"], 1e-3), row
    train = {row["model"]: row for row in result["train"]}
    # Backpropagation through the solver needs no backward evaluations; an adjoint does.
    assert train["pyro-nf (direct)"]["nfe_backward"] == 0
    assert train["pyro-nf (adjoint, seminorm)"]["nfe_backward"] > 0


def test_cnf_work_memory_child_reports_a_peak(capsys):
    bench = load_cnf_work()
    bench.memory_child("pyro-nf (direct)", 2, 16)
    peak = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_rss_mb"]
    assert math.isfinite(peak) and peak >= 0
