"""Quality of ``AutoFlow`` at its defaults on the posterior suite's targets (slow).

Each test trains with the suite's own recipe (``benchmarks/posteriors.py``: ClippedAdam,
lr 1e-2 decayed to 1e-3, 8 vectorized particles) and states its bar and the reason
for it. The bars are properties a flow guide must have, not numbers of one run: a
flow must beat the best Gaussian where the posterior is not Gaussian, and must not
diverge at the learning rate users start with.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from test_posteriors_benchmark import load_suite

from pyro_nf.infer import AutoFlow, fit_guide, psis_diagnostic

pytestmark = pytest.mark.slow


def recipe(steps: int) -> argparse.Namespace:
    return argparse.Namespace(
        steps=steps, lr=1e-2, final_lr=1e-3, particles=8, eval_samples=4000, seed=0
    )


def gaussian_and_flow(target: str, family: str, options: dict) -> tuple[dict, dict]:
    """``AutoMultivariateNormal`` and ``AutoFlow(family, **options)`` trained on one
    suite target with the suite's 1000-step recipe: their scored rows."""
    suite = load_suite()
    problem = suite.make_problems([target])[target]
    args = recipe(1000)
    gaussian = suite.evaluate(
        problem,
        "AutoMultivariateNormal",
        suite.guide_factories({})["AutoMultivariateNormal"],
        args,
    )
    name = f"AutoFlow({family})"
    flow = suite.evaluate(problem, name, suite.guide_factories(options)[name], args)
    assert gaussian["status"] == flow["status"] == "ok"
    return gaussian, flow


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("iaf", {}),
        ("maf", {}),
        ("realnvp", {}),
        ("realnvp", {"gradient": "path"}),
        ("iaf", {"base": "student_t"}),
    ],
    ids=["iaf", "maf", "realnvp", "realnvp-path", "iaf-student_t"],
)
def test_flow_guide_halves_the_gaussian_kl_on_the_banana(family, options):
    """KL(q || p) of the default flow guide is at most half the full-covariance Gaussian's.

    Bar: the banana's curvature is exactly what a Gaussian cannot represent (its
    best KL is bounded away from 0), while a flow can represent the banana exactly
    (a unit-Jacobian polynomial map of a Gaussian); at the same budget a flow that
    does not halve the Gaussian's gap has not learned the shape. Both guides are
    trained here, so the bar moves with the budget, not with one stored number. The
    training options (path-derivative gradient, Student-t base) must clear it too.
    """
    gaussian, flow = gaussian_and_flow("banana", family, options)
    assert flow["kl"] <= 0.5 * gaussian["kl"], (flow["kl"], gaussian["kl"])


@pytest.mark.parametrize(
    ("family", "steps"), [("iaf", 300), ("realnvp", 300), ("maf", 60), ("cnf", 100)]
)
def test_defaults_are_stable_at_lr_1e2_on_the_100d_target(family, steps):
    """No NaN at a constant lr 1e-2 on the ~100-dimensional radon posterior, and progress.

    Bar: issue 10 requires defaults that survive the learning rate users start with
    (Pyro's spline guide diverges there); "progress" means the ELBO after training
    exceeds the ELBO at initialization, a bar any working optimizer clears.
    (maf samples in D sequential passes and cnf solves an ODE per pass, so they get fewer
    steps.) Every loss must also stay above a floor that a valid ELBO cannot cross.
    """
    suite = load_suite()
    problem = suite.make_problems(["radon"])["radon"]
    pyro.set_rng_seed(0)
    guide = AutoFlow(problem.model, flow=family)
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(problem.model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    guide()  # build the guide, then score its initial state

    def current_elbo() -> float:
        with torch.no_grad():
            return psis_diagnostic(problem.model, guide, num_samples=500, max_plate_nesting=1).elbo

    initial = current_elbo()
    losses = [svi.step() for _ in range(steps)]
    assert all(math.isfinite(loss) for loss in losses)
    # A loss is a noisy -ELBO >= -log Z. The best guide on this posterior reaches ELBO
    # -530 (docs/benchmarks/posteriors.md), and log Z is not 30 nats above it: a loss
    # below 500 is a broken estimate (a CNF whose stiff field outran its solver's
    # tolerance once gave -39,684), not a good guide.
    assert min(losses) > 500.0, min(losses)
    assert current_elbo() > initial


@pytest.mark.parametrize("family", ["iaf", "realnvp"])
def test_triangular_default_is_no_worse_than_the_full_covariance_gaussian(family):
    """On the logistic regression the default iaf guide's ELBO (and realnvp's, whose
    guides above 16 latents get the triangular layer too) is at least
    ``AutoMultivariateNormal``'s at the same budget.

    Bar: the guide's triangular affine layer makes every full-covariance Gaussian a
    member of its family (flow at the identity), and this 31-coefficient posterior is
    close to Gaussian with strong correlations, so a default that trails the
    Gaussian guide here has lost what the layer is for. Both are trained here, so the
    bar moves with the budget. (At 1000 steps the suite measured about -56.7 for the
    flows against -59.9 for the Gaussian; the bar asks only for no loss. maf has the
    same layer but samples in 31 sequential passes per draw, so it is left to the suite.)
    """
    gaussian, flow = gaussian_and_flow("logistic", family, {})
    assert flow["elbo"] >= gaussian["elbo"], (flow["elbo"], gaussian["elbo"])


def test_default_guide_covers_both_modes_of_the_bimodal_target():
    """The default (iaf) guide puts mass on both modes of the suite's two-mode mixture.

    Bar: KL(q || p) below log 2 - 0.1. The modes of ``0.5 N((-2, 0), 0.25 I) + 0.5
    N((2, 0), 0.25 I)`` are 8 sds apart, so a guide on one mode has KL = log 2 +
    KL(q || that mode) >= log 2 (up to the modes' overlap, below 1e-10); a tenth of a
    nat under that bound needs mass on the other mode. Affine-only iaf guides sit at
    log 2 here (one mode, every seed measured); the spline layers between the affine
    ones are what splits the first coordinate by its own sign.
    """
    suite = load_suite()
    problem = suite.make_problems(["bimodal"])["bimodal"]
    row = suite.evaluate(
        problem, "AutoFlow(iaf)", suite.guide_factories({})["AutoFlow(iaf)"], recipe(1000)
    )
    assert row["status"] == "ok"
    assert row["kl"] < math.log(2.0) - 0.1, row["kl"]


def test_default_realnvp_guide_covers_both_modes_on_three_of_four_axes():
    """The default realnvp guide (a spline pair first, the final multiplier) puts mass on
    both modes of the two-mode mixture turned to 0°, 45°, 90° and 135°, on three axes of
    four at least.

    Bar: a cell holds both modes when KL < log 2 - 0.1 (as above). Over 36 cells (four
    axes, seeds 0-8) the default kept one mode in 4 (11%), so two or more of four
    one-mode cells has a chance of about 5%; the former default (four affine couplings)
    kept one mode in 22 of 36 (61%) and would fail this bar with a chance of about 83%
    (docs/benchmarks/posteriors-defaults.md, "Real NVP and the bimodal target"). Which mode a
    guide keeps is a lottery of its first steps, so one seed cannot tell the two apart
    for sure: at seed 0 on the machine of those runs the new default held both modes on
    all four axes and the former on three.
    """
    suite = load_suite()
    targets = ["bimodal", "bimodal@45", "bimodal@90", "bimodal@135"]
    problems = suite.make_problems(targets)
    make_guide = suite.guide_factories({})["AutoFlow(realnvp)"]
    kls = []
    for target in targets:
        row = suite.evaluate(problems[target], "AutoFlow(realnvp)", make_guide, recipe(1000))
        assert row["status"] == "ok"
        kls.append(row["kl"])
    both_modes = sum(kl < math.log(2.0) - 0.1 for kl in kls)
    assert both_modes >= 3, kls


def fit_guide_kls_on_the_four_axes(
    seed: int, target: str = "bimodal", **fit_options: Any
) -> list[float]:
    """KL(q || p) of ``fit_guide(model, **fit_options)`` trained from ``seed`` on the
    two-mode target (``"bimodal"``, equal masses, or ``"lopsided"``, masses 3/4 and
    1/4) turned to each of the four axes (0, 45, 90 and 135 degrees)."""
    suite = load_suite()
    targets = [target] + [f"{target}@{angle}" for angle in (45, 90, 135)]
    problems = suite.make_problems(targets)
    kls = []
    for target in targets:
        problem = problems[target]
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = fit_guide(problem.model, max_plate_nesting=1, **fit_options)
        with torch.no_grad():
            result = psis_diagnostic(
                problem.model, guide, num_samples=4000, batch_size=1000, max_plate_nesting=1
            )
        kls.append(problem.log_z - result.elbo)
    return kls


def test_fit_guide_annealed_holds_both_modes_with_balanced_masses_on_every_axis():
    """``fit_guide(model, anneal=0.5, anneal_start=0.1)`` (the default iaf guide, the
    first half of the steps on the tempered likelihood, beta from 0.1) covers both
    modes of the two-mode mixture on all four axes, with masses close to equal.

    Bars: KL < 0.3 on every axis (a guide of the right shape with mode masses w and
    1 - w has KL = w log 2w + (1 - w) log 2(1 - w), 0.3 at w = 0.86) and a mean over the
    four axes below 0.15. Over 12 cells (four axes, seeds 0-2) the annealed fit_guide
    had KL 0.029 to 0.117 (mean 0.070); without annealing it kept one mode (KL > 0.67)
    in 4 of 12 cells, and its means over the four axes were 0.25, 0.39 and 0.34
    (docs/benchmarks/posteriors-defaults.md, "Annealing the likelihood"). So the bars leave more
    than twice the measured worst case and fail the guide that is not annealed at
    every seed measured. (Those runs predate the default budget's clamp of the
    gradient's elements at 10, which this test now trains with.)
    """
    kls = fit_guide_kls_on_the_four_axes(seed=0, anneal=0.5, anneal_start=0.1)
    assert max(kls) < 0.3, kls
    assert sum(kls) / len(kls) < 0.15, kls


def test_fit_guide_at_its_defaults_holds_both_modes():
    """``fit_guide(model)`` with nothing else (its default budget anneals a fifth of
    the steps from beta 0.5 and clamps the gradient's elements at 10) keeps both modes
    of the two-mode mixture on at least three of the four axes, with a mean KL below
    0.3, at seed 1.

    Bars: a guide that keeps one mode has KL log 2 (0.69), so "both modes" is KL below
    log 2 - 0.1; a mean KL of 0.3 is a guide whose mode masses are 0.86 and 0.14 on
    average (w log 2w + (1 - w) log 2(1 - w)). Over seeds 0-5 (24 cells,
    docs/benchmarks/posteriors-defaults.md, "Annealing the likelihood") the default kept both
    modes in every cell, with means over the four axes of 0.07 to 0.19 (before the
    clamp: one mode in one cell, seed 5, means 0.12 to 0.23); without annealing it kept
    one mode in 7 cells, on two axes at seeds 1 and 3, with means 0.17 to 0.39 (0.39 at
    seed 1). Seed 1 is a seed where the guide that is not annealed fails both bars.
    """
    kls = fit_guide_kls_on_the_four_axes(seed=1)
    assert sum(kl < math.log(2.0) - 0.1 for kl in kls) >= 3, kls
    assert sum(kls) / len(kls) < 0.3, kls


def test_a_two_flow_mixture_holds_both_modes_with_equal_masses():
    """``AutoFlow(model, components=2)`` (two iaf flows of the default build, equal
    weights, stratified draws) trained with the suite's recipe on the two-mode mixture
    turned to each of the four axes, seed 0: KL below 0.1 in at least three of the four
    cells.

    Bar: a guide on one mode has KL >= log 2 (0.69); one that holds both with masses w
    and 1 - w has KL >= w log 2w + (1 - w) log 2(1 - w), 0.1 at w = 0.72. The mixture
    holds the modes with one component each, so its masses are 1/2 by construction.
    Over 16 cells (four axes, seeds 0-3; docs/benchmarks/posteriors-defaults.md, "A mixture of
    flows") the iaf mixture had KL below 0.1 in 14 (0.014 to 0.093; the others 0.13 and
    0.58) and met this bar at every seed; two cells of four above 0.1 has a chance of
    about 8% at that rate. The one-flow default holds both modes with unequal masses:
    in the same 16 cells it was below 0.1 in 4, one per seed, and failed the bar at
    every seed.
    """
    suite = load_suite()
    targets = ["bimodal", "bimodal@45", "bimodal@90", "bimodal@135"]
    problems = suite.make_problems(targets)
    make_guide = suite.guide_factories({"components": 2})["AutoFlow(iaf)"]
    kls = []
    for target in targets:
        row = suite.evaluate(problems[target], "AutoFlow(iaf)", make_guide, recipe(1000))
        assert row["status"] == "ok"
        kls.append(row["kl"])
    assert sum(kl < 0.1 for kl in kls) >= 3, kls


def test_fit_guide_with_two_flows_holds_both_modes_with_equal_masses():
    """``fit_guide(model, flow="realnvp", flow_options={"components": 2,
    "mixture_weights": "equal"})`` (its default budget, with two realnvp flows of equal
    weight) trained on the two-mode mixture turned to each of the four axes, seed 0: KL
    below 0.1 in at least three of the four cells.

    Bar: as for the two-flow mixture in the suite's loop above (0.1 is mode masses of
    0.72 and 0.28). Over 16 cells (four axes, seeds 0-3; docs/benchmarks/posteriors-defaults.md,
    "Annealing the likelihood") it had KL below 0.1 in 15 (mean 0.033; the other 0.11)
    and met this bar at every seed. One realnvp flow through the same call was below
    0.1 in 5 of those 16 cells (mean KL 0.208) and failed the bar at every seed (2, 2,
    1 and 0 of four), so the bar tells the two apart.
    """
    kls = fit_guide_kls_on_the_four_axes(
        seed=0, flow="realnvp", flow_options={"components": 2, "mixture_weights": "equal"}
    )
    assert sum(kl < 0.1 for kl in kls) >= 3, kls


def test_fit_guide_with_learned_weights_fits_modes_of_unequal_mass():
    """``fit_guide(model, flow_options={"components": 2})``: two iaf flows whose weights
    MixtureELBO trains (``fit_guide``'s weights for a guide of several flows, held at
    1/2 while the likelihood is tempered), on the two-mode mixture of masses 3/4 and
    1/4 turned to each of the four axes, seed 0: KL below 0.1 in at least three of the
    four cells.

    Bar: 0.1 is what a guide of the right shape with masses 0.5 and 0.5 scores against
    3/4 and 1/4 (0.144) less a margin. Over 32 cells (four axes, seeds 0-7;
    docs/benchmarks/posteriors-defaults.md, "Learned mixture weights") these weights
    had KL below 0.1 in 30 (4, 4, 3, 4, 3, 4, 4, 4 by seed; mean 0.036): the bar held
    at every seed. Learned from step 0 they had KL below 0.1 in all 16 cells of seeds
    0-3 (mean 0.027). Two flows of equal weight through the same call were below 0.1 in
    2, 1, 1 and 1 of the four cells at seeds 0-3 (mean 0.132) and failed it at every
    seed, so the bar tells the learned weights from equal ones.
    """
    kls = fit_guide_kls_on_the_four_axes(seed=0, target="lopsided", flow_options={"components": 2})
    assert sum(kl < 0.1 for kl in kls) >= 3, kls
