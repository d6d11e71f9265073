"""Smoke test of the density suite's ``--quick`` mode (benchmarks/density.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sklearn")
pytest.importorskip("zuko")


def load_density_suite():
    return load_script("benchmarks/density.py", "benchmark_density")


def test_quick_mode_scores_every_model_and_writes_its_outputs(tmp_path):
    suite = load_density_suite()
    models = [
        "pyro-nf spline coupling",
        "pyro-nf spline coupling t",
        "pyro-nf maf",
        "pyro spline AR",
        "zuko NSF",
        "pyro-nf cnf (flow matching)",
    ]
    output = tmp_path / "rows.json"
    result = suite.main(
        [
            "--quick",
            "--models",
            *models,
            "--output",
            str(output),
            "--figure",
            str(tmp_path / "g.png"),
        ]
    )
    rows = result["rows"]
    toy_rows = [row for row in rows if row["data"] == "two_moons"]
    assert [row["model"] for row in toy_rows] == models
    tabular_models = [m for m in suite.TABULAR_MODELS if m in models]
    assert [row["model"] for row in rows if row["data"].startswith("wine")] == tabular_models
    for row in rows:
        assert math.isfinite(row["nll"]) and row["se"] > 0 and row["finite"], row
    assert json.loads(output.read_text())["rows"] == rows
    assert (tmp_path / "g.png").stat().st_size > 0
    assert "| two_moons |" in result["table"]
    # Flow matching takes 50 times the budget's (5) steps, one field evaluation each.
    matching = next(row for row in toy_rows if row["model"] == "pyro-nf cnf (flow matching)")
    assert matching["nfe_train"] == 1 and matching["nfe_eval"] > 0


def test_a_flow_matching_model_trains_by_its_own_loss_and_not_through_svi():
    suite = load_density_suite()
    model = suite.MODELS["pyro-nf cnf (flow matching)"](2, 8)
    assert (model.step_factor, model.lr_factor) == (50, 10.0)
    budget = suite.Budget(params=0, steps=2, batch=16, lr=1e-3)
    steps = []
    original = model.loss
    model.loss = lambda x: steps.append(x.shape) or original(x)
    suite.train(model, lambda step: torch.randn(16, 2), budget)
    assert len(steps) == 100  # 50 x 2 steps, each on the model's own loss
    with pytest.raises(ValueError, match="does not train by likelihood"):
        suite.svi_step(model, budget, 100)


def test_budget_sizing_hits_the_target_within_one_width_step():
    suite = load_density_suite()
    for name in ("pyro-nf spline coupling", "zuko NSF", "pyro spline AR"):
        make = suite.MODELS[name]
        width = suite.width_for_budget(make, 2, 12_000)
        count = suite.count_parameters(make(2, width))
        neighbours = [suite.count_parameters(make(2, w)) for w in (width - 1, width + 1)]
        # The chosen width is the closest: no neighbouring width is nearer the target.
        assert all(abs(count - 12_000) <= abs(n - 12_000) for n in neighbours), name


def test_unknown_names_are_rejected_before_training():
    suite = load_density_suite()
    with pytest.raises(ValueError, match="unknown models"):
        suite.main(["--quick", "--models", "no such flow"])
    with pytest.raises(ValueError, match="unknown data sets"):
        suite.main(["--quick", "--toys", "no_such_toy"])


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["pyro-nf maf", "pyro-nf spline coupling"])
def test_svi_under_a_subsampled_plate_reaches_the_direct_nll(model_name):
    suite = load_density_suite()
    budget = suite.Budget(params=3000, steps=300, batch=256, test_points=5000)
    sample = suite.toy_sampler("two_moons")
    test = sample(budget.test_points, 10**6)
    scores = {}
    for trainer in ("direct", "svi"):
        torch.manual_seed(0)
        model = suite.MODELS[model_name](2, 24)
        suite.train(model, lambda step: sample(budget.batch, step), budget, trainer=trainer)
        scores[trainer] = suite.nll_and_error(model, test)
    (direct, error), (svi, _) = scores["direct"], scores["svi"]
    # Training moved the model far from its start (a standard normal scores about 3.9).
    assert direct < 3.2
    # Same minibatches and Adam's invariance to the ELBO's scale (plate size / batch):
    # the two paths agree far inside the held-out NLL's standard error.
    assert abs(svi - direct) < error, scores


def test_fit_learning_rate_study_runs_and_scores(tmp_path):
    study = load_script("benchmarks/fit_lr.py", "benchmark_fit_lr")
    output = tmp_path / "rows.json"
    argv = ["--toys", "banana", "--families", "realnvp", "spline coupling t", "cnf flow matching"]
    argv += ["--lrs", "1e-2", "--num-train", "200", "--test-points", "300", "--epochs", "3"]
    rows = study.main([*argv, "--output", str(output)])
    assert [(row["family"], row["lr"]) for row in rows] == [
        ("realnvp", 1e-2),
        ("spline coupling t", 1e-2),
        ("cnf flow matching", 1e-2),
    ]
    assert all(row["epochs"] == 3 for row in rows)  # --epochs reaches fit
    for row in rows:
        assert math.isfinite(row["nll"]) and row["se"] > 0 and row["epochs"] > 0, row
    assert json.loads(output.read_text()) == rows


@pytest.mark.slow
def test_a_student_t_base_fits_the_heavy_tailed_toy_to_its_exact_nll():
    # The suite's budget and seed 0. Over seeds 0-4 (docs/benchmarks/density.md) the
    # spline coupling flow with a Student-t base was 0.0003-0.0012 nats above the exact
    # NLL of each test set and the same flow on a normal base 0.046-0.062 above it,
    # so the bars (0.02 and 0.03) sit far from both.
    suite = load_density_suite()
    budget = suite.Budget()
    test = suite.student_t(budget.test_points, 10**6)
    exact = -suite.student_t_log_prob(test).mean()
    excess = {}
    for name in ("pyro-nf spline coupling t", "pyro-nf spline coupling"):
        torch.manual_seed(0)
        model = suite.MODELS[name](2, suite.width_for_budget(suite.MODELS[name], 2, 12_000))
        suite.train(model, lambda step: suite.student_t(budget.batch, step), budget)
        excess[name] = suite.nll_and_error(model, test)[0] - float(exact)
    assert excess["pyro-nf spline coupling t"] < 0.02, excess
    assert excess["pyro-nf spline coupling"] > 0.03, excess


def test_cnf_rows_carry_their_cost_and_the_regularized_cnf_trains_under_svi():
    suite = load_density_suite()
    regularized = suite.CNFOptions(depth=3, kinetic=0.01, jacobian=0.01).name()
    models = [regularized, "zuko CNF"]
    for trainer in ("direct", "svi"):
        names = models if trainer == "direct" else [regularized]  # zuko's has no Pyro path
        args = ["--quick", "--study", "cnf", "--models", *names, "--trainer", trainer]
        result = suite.main(args)
        for row in result["rows"]:
            assert math.isfinite(row["nll"]) and row["finite"], row
            # An adaptive solve evaluates the field at least once per step of it.
            assert row["nfe_train"] >= 1 and row["nfe_eval"] >= 1, row
        assert f"| two_moons | {regularized} |" in suite.cost_table(result["rows"])


def test_cnf_model_adds_the_regularizers_and_scores_at_the_scoring_tolerance():
    suite = load_density_suite()
    options = suite.CNFOptions(depth=2, kinetic=0.5, jacobian=0.25, train_tol=1e-2)
    torch.manual_seed(0)
    model = suite.pyro_nf_cnf(options)(2, 8)
    layer = next(m for m in model.modules() if hasattr(m, "ode"))
    model.train()
    assert layer.ode.rtol == layer.ode.atol == 1e-2
    x = torch.randn(7, 2)
    model.log_prob(x)
    penalty = model.penalty()
    terms = suite_regularization(model)
    expected = 0.5 * terms["kinetic_energy"] + 0.25 * terms["jacobian_frobenius"]
    assert penalty.shape == (7,) and torch.allclose(penalty, expected)
    assert bool((penalty > 0).all())  # both integrands are squares of a non-zero field
    assert model.evaluations() >= 1
    model.eval()
    assert layer.ode.rtol == layer.ode.atol == options.eval_tol


def test_cnf_options_reach_the_dynamics():
    suite = load_density_suite()
    for init in ("preserve", "torch"):
        options = suite.CNFOptions(depth=3, init=init, init_scale=0.5)
        model = suite.pyro_nf_cnf(options)(2, 8)
        dynamics = next(m for m in model.modules() if hasattr(m, "ode")).dynamics
        assert dynamics.init == init and dynamics.hidden_dims == (8, 8, 8)
        assert options.name().endswith("torch-init") == (init == "torch")
    assert suite.CNFOptions(init="torch").name() in suite.cnf_study_models()


def suite_regularization(model):
    from pyro_nf.transforms import collect_regularization

    return collect_regularization(model.module)


@pytest.mark.slow
def test_a_cnf_trained_by_flow_matching_fits_the_rings():
    # The suite's model at its budget, seed 0 (about 90 CPU s). The bar is the best
    # peer's score on the rings (Pyro's spline autoregressive flow, 3.079); the CNF by
    # likelihood is at 3.343. By flow matching the CNF scored 2.818 at the default
    # learning rate and 2.952 / 3.011 at three times more and less (docs), so the bar
    # holds across that range and fails for the likelihood CNF.
    suite = load_density_suite()
    torch.manual_seed(0)
    rows = suite.run_toy(
        "rings",
        {"pyro-nf cnf (flow matching)": suite.MODELS["pyro-nf cnf (flow matching)"]},
        suite.Budget(),
        None,
        0,
        seed=0,
    )
    assert rows[0]["nll"] < 3.079, rows
