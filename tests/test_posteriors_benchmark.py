"""The posterior suite (``benchmarks/posteriors.py``): its references and a quick run.

The closed-form references are checked against exact draws of each target, the stored
NUTS references for their shape and convergence, and ``--quick`` for a full pass
through every target and guide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytest.importorskip("sklearn")


def load_suite():
    return load_script("benchmarks/posteriors.py", "posteriors_suite")


def assert_moments(draws: torch.Tensor, problem, tolerance: float) -> None:
    """Exact draws' moments agree with the reference to ``tolerance`` sds."""
    error = (draws.mean(0) - problem.mean).abs() / problem.sd
    log_ratio = (draws.std(0) / problem.sd).log().abs()
    assert error.max() < tolerance, error
    assert log_ratio.max() < tolerance, log_ratio


def test_banana_reference_matches_exact_draws():
    problem = load_suite().make_problems(["banana"])["banana"]
    x1 = torch.randn(200_000)
    x2 = torch.randn(200_000) + x1**2 - 1  # the unit-Jacobian map of the banana
    # 200k draws: the moments' Monte Carlo error is ~0.003 sd (0.01 for the sd of x2,
    # whose fourth moment is large); 0.03 is several of those and far below a real bug.
    assert_moments(torch.stack([x1, x2], -1), problem, 0.03)


def grid_weights(log_density) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1201 x 1201 grid over [-6, 6]^2 (float64), which holds all the two-mode
    targets' mass, and each point's mass ``exp(log_density(x)) dx^2``."""
    grid = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1)
    return x, log_density(x).exp() * (grid[1] - grid[0]) ** 2


def grid_moments(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and sd of each coordinate under the grid's point masses."""
    mean = (weights[..., None] * x).sum((0, 1))
    return mean, ((weights[..., None] * x.pow(2)).sum((0, 1)) - mean.pow(2)).sqrt()


def test_bimodal_reference_and_normalizer():
    suite = load_suite()
    problem = suite.make_problems(["bimodal"])["bimodal"]
    sign = torch.randint(0, 2, (200_000,)) * 2 - 1
    draws = torch.stack([2.0 * sign, torch.zeros(200_000)], -1) + 0.5 * torch.randn(200_000, 2)
    assert_moments(draws, problem, 0.03)  # as for the banana: MC error ~0.003 sd
    # log Z = 0: a Riemann sum on a fine grid that holds all the mass.
    mass = grid_weights(suite._bimodal_log_density)[1].sum()
    assert float(mass) == pytest.approx(1.0, abs=1e-6)
    assert problem.log_z == 0.0


@pytest.mark.parametrize("angle", [45.0, 90.0, 135.0])
def test_turned_bimodal_target_is_the_same_mixture_on_another_axis(angle):
    """``bimodal@DEG``: the modes at +-2 (cos, sin) of DEG; its stated moments and its
    density (normalized, and the rotation of the unturned one) checked by a grid sum."""
    suite = load_suite()
    name = f"bimodal@{angle:g}"
    problem = suite.make_problems([name])[name]
    x, weights = grid_weights(lambda x: suite._bimodal_log_density(x, angle=angle))
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    mean, sd = grid_moments(x, weights)
    assert torch.allclose(mean, torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(sd.float(), problem.sd.float(), atol=1e-4)
    # Turning x back by the same angle gives the unturned density.
    radians = math.radians(angle)
    rotation = torch.tensor(
        [[math.cos(radians), -math.sin(radians)], [math.sin(radians), math.cos(radians)]],
        dtype=torch.float64,
    )
    points = torch.randn(100, 2, dtype=torch.float64)
    expected = suite._bimodal_log_density(points)
    assert torch.allclose(suite._bimodal_log_density(points @ rotation.T, angle=angle), expected)
    assert problem.log_z == 0.0


@pytest.mark.parametrize("angle", [0.0, 45.0, 120.0])
def test_lopsided_target_has_three_quarters_of_its_mass_on_the_plus_mode(angle):
    """``lopsided@DEG``: the two modes with masses 3/4 at +c and 1/4 at -c; its stated
    moments, its normalizer and the split of its mass checked by a grid sum."""
    suite = load_suite()
    name = f"lopsided@{angle:g}" if angle else "lopsided"
    problem = suite.make_problems([name])[name]
    x, weights = grid_weights(
        lambda x: suite._bimodal_log_density(x, angle=angle, weight=suite.LOPSIDED_WEIGHT)
    )
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    axis = torch.tensor(suite._bimodal_axis(angle), dtype=torch.float64)
    # Each mode leaves Phi(-shift / scale) = Phi(-4) of its mass across the midline.
    crossing = 0.5 * math.erfc(4 / math.sqrt(2))
    plus_side = 0.75 * (1 - crossing) + 0.25 * crossing
    assert float(weights[(x @ axis) > 0].sum()) == pytest.approx(plus_side, abs=5e-6)
    mean, sd = grid_moments(x, weights)
    assert torch.allclose(mean.float(), problem.mean.float(), atol=1e-4)
    assert torch.allclose(sd.float(), problem.sd.float(), atol=1e-4)
    assert problem.log_z == 0.0
    # The model's density is the target's: its factor plus the N(0, I) prior.
    trace = pyro.poutine.trace(problem.model).get_trace()
    value = trace.nodes["x"]["value"]
    log_joint = trace.log_prob_sum()
    torch.testing.assert_close(
        log_joint, suite._bimodal_log_density(value, angle=angle, weight=0.75)
    )


def test_the_equal_mixture_is_unchanged_by_the_mass_argument():
    """At w = 1/2 the density is its earlier form, logsumexp(...) - log 2, to the bit (the
    documented cells reproduce)."""
    suite = load_suite()
    x = torch.randn(1000, 2)
    centre = torch.tensor([suite.BIMODAL_SHIFT, 0.0])
    component = dist.Normal(0.0, suite.BIMODAL_SCALE).expand([2]).to_event(1)
    earlier = torch.logsumexp(
        torch.stack([component.log_prob(x - centre), component.log_prob(x + centre)]), 0
    ) - math.log(2.0)
    assert torch.equal(suite._bimodal_log_density(x), earlier)


def test_funnel_reference_matches_exact_draws():
    problem = load_suite().make_problems(["funnel"])["funnel"]
    v = 3.0 * torch.randn(400_000, dtype=torch.float64)
    x = (0.5 * v).exp()[:, None] * torch.randn(400_000, 9, dtype=torch.float64)
    draws = torch.cat([v[:, None], x], -1)
    # v's moments are known to ~0.002 sd from these draws. x_i has E[x^4] = 3 e^{18}, so
    # neither its sample sd nor a sample mean of e^v is a usable check; its variance
    # E[e^v] is checked by quadrature of e^v N(v; 0, 9) on a grid holding all the mass.
    assert_moments(draws[:, :1], _slice(problem, 0, 1), 0.02)
    grid = torch.linspace(-40, 40, 80_001, dtype=torch.float64)
    second_moment = (grid.exp() * torch.distributions.Normal(0.0, 3.0).log_prob(grid).exp()).sum()
    second_moment = second_moment * (grid[1] - grid[0])
    assert float(problem.sd[1]) ** 2 == pytest.approx(float(second_moment), rel=1e-6)
    assert float(problem.mean.abs().max()) == 0.0  # symmetric in each x_i and in v


def _slice(problem, start: int, stop: int):
    return type(problem)(
        problem.name,
        problem.model,
        stop - start,
        problem.log_z,
        problem.mean[start:stop],
        problem.sd[start:stop],
    )


def test_unconstrained_flat_inverts_supports_in_site_order():
    suite = load_suite()
    draws = {"mu": torch.randn(7), "tau": torch.rand(7) + 0.1, "theta": torch.randn(7, 8)}
    flat = suite.unconstrained_flat(suite.schools_centred, draws)
    assert flat.shape == (7, 10)
    torch.testing.assert_close(flat[:, 0], draws["mu"])
    torch.testing.assert_close(flat[:, 1], draws["tau"].log())
    torch.testing.assert_close(flat[:, 2:], draws["theta"])


@pytest.mark.parametrize("name", ["schools_c", "schools_nc", "logistic", "radon"])
def test_stored_nuts_reference(name):
    suite = load_suite()
    path = suite.REFERENCE_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"no stored reference {path.name}: run benchmarks/posteriors_reference.py")
    record = json.loads(path.read_text())
    problem = suite.make_problems([name])[name]
    assert len(record["mean"]) == len(record["sd"]) == problem.dim
    assert all(sd > 0 and math.isfinite(sd) for sd in record["sd"])
    # Convergence bars of Vehtari et al. (2021): split R-hat below 1.01 and a bulk ESS
    # above 100 per chain, so a mean is known to ~1/sqrt(ESS) < 0.05 sd.
    assert record["nuts"]["max_rhat"] < 1.01
    assert record["nuts"]["min_ess"] > 100 * record["nuts"]["chains"]


def test_quick_run_every_guide_on_the_banana(tmp_path):
    pytest.importorskip("zuko")  # one of the suite's guides is zuko's NSF
    suite = load_suite()
    output = tmp_path / "rows.json"
    rows = suite.main(["--quick", "--targets", "banana", "--output", str(output)])
    guides = [name for name in suite.guide_factories({}) if not name.startswith("fit_guide(")]
    assert [row["guide"] for row in rows] == guides
    assert json.loads(output.read_text())[0]["guide"] == guides[0]
    for row in rows:
        # A five-step run may not be good, but every guide must run and be scored.
        assert row["status"] == "ok", row
        assert math.isfinite(row["elbo"]) and row["seconds"] >= 0
        assert row["kl"] == pytest.approx(math.log(2 * math.pi) - row["elbo"])
        assert math.isfinite(row["err"]) and math.isfinite(row["lsd"])


def test_quick_run_every_target(tmp_path):
    suite = load_suite()
    guides = "AutoNormal,AutoFlow(realnvp)"
    rows = suite.main(["--quick", "--guides", guides])
    assert [(row["target"], row["guide"]) for row in rows] == [
        (target, guide) for target in suite.TARGETS for guide in guides.split(",")
    ]
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["elbo"])
        assert (
            len(row["moments"]["mean"]) == suite.make_problems([row["target"]])[row["target"]].dim
        )


def test_quick_run_of_the_training_options():
    """The suite's options for issue 10's training signal run end to end: the IWAE and
    Renyi objectives, the path-derivative gradient, the Student-t base and fit_guide."""
    suite = load_suite()
    rows = suite.main(
        [
            "--quick",
            "--targets",
            "funnel",
            "--guides",
            "AutoFlow(realnvp)",
            "--objective",
            "iwae",
            "--flow-option",
            "gradient=path",
            "--flow-option",
            "base=student_t",
        ]
    )
    rows += suite.main(
        ["--quick", "--targets", "funnel", "--guides", "AutoFlow(iaf)", "--objective", "renyi:0.5"]
    )
    rows += suite.main(["--quick", "--targets", "funnel", "--guides", "fit_guide(high)"])
    for row in rows:
        assert row["status"] == "ok", row
        assert math.isfinite(row["elbo"]) and math.isfinite(row["err"])
    with pytest.raises(ValueError, match="unknown objective"):
        suite.make_objective("kl", 8)


def test_anneal_and_clip_flags_reach_fit_guide_rows(monkeypatch):
    """``--anneal``, ``--anneal-start`` and ``--gradient-clip`` train the fit_guide rows
    too; without them fit_guide gets its preset's annealing (the default's: a fifth of
    the steps from beta 0.5) and clamp (None: the preset's)."""
    suite = load_suite()
    calls = []
    real_fit_guide = suite.fit_guide

    def recording_fit_guide(model, **kwargs):
        names = ("anneal", "anneal_start", "gradient_clip")
        calls.append({name: kwargs[name] for name in names})
        return real_fit_guide(model, **kwargs)

    monkeypatch.setattr(suite, "fit_guide", recording_fit_guide)
    command = ["--quick", "--targets", "bimodal", "--guides", "fit_guide(default)"]
    suite.main([*command, "--anneal", "0.2", "--anneal-start", "0.5", "--gradient-clip", "10"])
    suite.main(command)
    preset = suite.GUIDE_BUDGETS["default"]
    assert calls == [
        {"anneal": 0.2, "anneal_start": 0.5, "gradient_clip": 10.0},
        {"anneal": preset["anneal"], "anneal_start": preset["anneal_start"], "gradient_clip": None},
    ]


def test_fit_guide_rows_of_another_family(monkeypatch):
    """``fit_guide(default:FAMILY)`` trains fit_guide's default budget with that
    family's guide; ``fit_guide(default)`` with the preset's (iaf)."""
    suite = load_suite()
    flows = []
    real_fit_guide = suite.fit_guide

    def recording_fit_guide(model, **kwargs):
        flows.append(kwargs["flow"])
        return real_fit_guide(model, **kwargs)

    monkeypatch.setattr(suite, "fit_guide", recording_fit_guide)
    guides = "fit_guide(default),fit_guide(default:maf),fit_guide(default:realnvp)"
    rows = suite.main(["--quick", "--targets", "banana", "--guides", guides])
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert flows == [None, "maf", "realnvp"]


def test_fit_guide_options_reach_only_the_fit_guide_rows(monkeypatch):
    """``--fit-guide-option`` goes over the preset's flow options of the fit_guide rows
    (the high preset keeps its others), and ``--flow-option`` does not reach them; without
    it they get the preset's options unchanged."""
    suite = load_suite()
    options, components = [], []
    real_fit_guide = suite.fit_guide

    def recording_fit_guide(model, **kwargs):
        options.append(kwargs["flow_options"])
        guide = real_fit_guide(model, **kwargs)
        components.append(getattr(guide.get_posterior(), "num_components", 1))
        return guide

    monkeypatch.setattr(suite, "fit_guide", recording_fit_guide)
    command = ["--quick", "--targets", "banana", "--budget-steps", "2"]
    rows = suite.main([*command, "--guides", "fit_guide(default)", "--flow-option", "components=3"])
    rows += suite.main(
        [*command, "--guides", "fit_guide(default)", "--fit-guide-option", "components=2"]
    )
    rows += suite.main(
        [*command, "--guides", "fit_guide(high)", "--fit-guide-option", "num_layers=2"]
    )
    assert [row["status"] for row in rows] == ["ok"] * 3
    high = suite.GUIDE_BUDGETS["high"]["flow_options"]
    assert options == [{}, {"components": 2}, {**high, "num_layers": 2}]
    assert components == [1, 2, 1]


def test_fit_guide_arguments_reach_fit_guide_over_the_flags(monkeypatch):
    """``--fit-guide-arg key=value`` passes a keyword argument of fit_guide as a Python
    literal, over the value the other flags give; without it fit_guide gets the preset's."""
    suite = load_suite()
    calls = []
    real_fit_guide = suite.fit_guide

    def recording_fit_guide(model, **kwargs):
        calls.append(kwargs)
        return real_fit_guide(model, **kwargs)

    monkeypatch.setattr(suite, "fit_guide", recording_fit_guide)
    command = ["--quick", "--targets", "banana", "--guides", "fit_guide(default)"]
    rows = suite.main([*command, "--budget-steps", "2"])
    rows += suite.main(
        [
            *command,
            "--budget-steps",
            "2",
            "--fit-guide-arg",
            "hold_weights_while_annealing=False",
            "--fit-guide-arg",
            "steps=3",
        ]
    )
    assert [row["status"] for row in rows] == ["ok"] * 2
    assert "hold_weights_while_annealing" not in calls[0] and calls[0]["steps"] == 2
    assert calls[1]["hold_weights_while_annealing"] is False and calls[1]["steps"] == 3


def test_the_suites_svi_loop_anneals_only_when_asked(monkeypatch):
    """The guides the suite's own SVI loop trains (Pyro's and AutoFlow's) see the model
    untempered unless ``--anneal`` is given, as Pyro users train them, whatever
    fit_guide's default preset does; ``--anneal`` alone starts the schedule at beta
    0.1, the start its annealing tables were measured with."""
    suite = load_suite()
    betas = []
    real_temper_likelihood = suite.temper_likelihood

    def recording_temper_likelihood(model, beta):
        betas.append(beta)
        return real_temper_likelihood(model, beta)

    monkeypatch.setattr(suite, "temper_likelihood", recording_temper_likelihood)
    command = ["--quick", "--targets", "bimodal", "--guides", "AutoNormal"]  # 5 steps
    suite.main(command)
    assert betas == [1.0] * 5
    betas.clear()
    suite.main([*command, "--anneal", "0.4"])
    assert betas == pytest.approx([0.1, 0.55, 1.0, 1.0, 1.0])
    betas.clear()
    suite.main([*command, "--anneal", "0.4", "--anneal-start", "0.5"])
    assert betas == pytest.approx([0.5, 0.75, 1.0, 1.0, 1.0])


def test_unknown_names_are_errors():
    suite = load_suite()
    with pytest.raises(ValueError, match="unknown target"):
        suite.make_problems(["nope"])
    with pytest.raises(ValueError, match="unknown guides"):
        suite.main(["--quick", "--guides", "Nope"])
