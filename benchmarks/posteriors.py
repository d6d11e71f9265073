"""A posterior suite with ground truth: every guide at the same budget on seven targets.

Targets (latent dimension D in the unconstrained space):

- ``banana`` (2): the twisted Gaussian of ``pyro_nf.infer.targets``; moments and log Z
  in closed form.
- ``funnel`` (10): Neal's funnel, ``v ~ N(0, 3^2)``, ``x_i | v ~ N(0, e^v)``; closed form.
- ``bimodal`` (2): an equal mixture of ``N((+-2, 0), 0.5^2 I)``; closed form.
  ``bimodal@DEG`` (not in the default list) turns the modes' axis by ``DEG`` degrees,
  to ``+-2 (cos, sin)``: a guide's chance to cover both modes depends on that axis.
  ``lopsided`` and ``lopsided@DEG`` (not in the default list): the same two modes with
  masses 3/4 (at ``+c``) and 1/4, so a guide must also get the masses right.
- ``schools_c`` / ``schools_nc`` (10): eight schools, centred and non-centred.
- ``logistic`` (31): Bayesian logistic regression on the breast-cancer data bundled
  with scikit-learn (30 standardised features and an intercept, ``N(0, 1)`` priors).
- ``radon`` (100): a radon-style varying-intercept model, centred, on 96 groups of
  data generated from a fixed seed.

The moments of the last four come from long NUTS runs made once by
``benchmarks/posteriors_reference.py`` and stored in ``benchmarks/posteriors/``.
Every moment is taken in the guide's unconstrained space (``biject_to(support).inv``
of each site, flattened in the model's order), where the guides live.

Per guide and target, from ``--eval-samples`` draws: the ELBO, ``KL = log Z - ELBO``
where log Z is known, ``err`` = mean over coordinates of ``|E_q - E_true| / sd_true``,
``lsd`` = mean of ``log(sd_q / sd_true)``, the same error after PSIS reweighting
(``err_psis``), PSIS k-hat and the training time. Every guide gets the same optimizer
(ClippedAdam, lr 1e-2 decayed to 1e-3), steps and particles (vectorized).

    python benchmarks/posteriors.py                       # the full table
    python benchmarks/posteriors.py --quick               # a smoke test (seconds)
    python benchmarks/posteriors.py --targets radon --guides "AutoFlow(iaf)" \\
        --flow-option init_scale=1.0                      # one cell with other options
    python benchmarks/posteriors.py --targets funnel \\
        --guides "fit_guide(default),fit_guide(default:maf)"  # fit_guide, its own recipe

The ``fit_guide(BUDGET)`` rows (not in the default list) train by
``pyro_nf.infer.fit_guide`` at that preset instead (``fit_guide(default:FAMILY)``: the
default budget with another family), annealed and with the gradient clamped as the
preset says unless ``--anneal`` or ``--gradient-clip`` is given, with the preset's flow
options and those of ``--fit-guide-option`` (``--flow-option`` reaches only the
``AutoFlow`` rows); ``--fit-guide-arg`` sets any other keyword argument of ``fit_guide``:

    python benchmarks/posteriors.py --targets bimodal --guides "fit_guide(default)" \
        --fit-guide-option components=2                   # two flows, learned weights
    python benchmarks/posteriors.py --targets bimodal --guides "fit_guide(default)" \
        --fit-guide-option components=2 --fit-guide-option mixture_weights=equal
    python benchmarks/posteriors.py --targets bimodal --guides "fit_guide(default)" \
        --fit-guide-option components=2 --fit-guide-arg hold_weights_while_annealing=False
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from pyro_nf.flows import FLOW_BUILDERS
from pyro_nf.infer import (
    GUIDE_BUDGETS,
    AutoFlow,
    NonFiniteLossError,
    annealed_inverse_temperature,
    fit_guide,
    psis_diagnostic,
    temper_likelihood,
)
from pyro_nf.infer import targets as known_targets
from pyro_nf.transforms import ContinuousFlow

REFERENCE_DIR = Path(__file__).resolve().parent / "posteriors"


# --------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A model (no arguments, data bound) and what we know about its posterior.

    ``mean`` and ``sd`` are the posterior moments of the flattened unconstrained latent
    (closed form, or from the stored NUTS reference; ``None`` until loaded) and
    ``log_z`` the log normalizer where it is known.
    """

    name: str
    model: Callable[[], None]
    dim: int
    log_z: float | None = None
    mean: Tensor | None = None
    sd: Tensor | None = None


#: The two-mode target: modes at +-BIMODAL_SHIFT along its axis, each N(., BIMODAL_SCALE^2 I).
BIMODAL_SHIFT, BIMODAL_SCALE = 2.0, 0.5
#: The mass of the ``+c`` mode of the ``lopsided`` target (the ``bimodal`` one has 1/2).
LOPSIDED_WEIGHT = 0.75


def _bimodal_axis(angle: float) -> tuple[float, float]:
    """The unit vector of the modes' axis, ``(cos, sin)`` of ``angle`` degrees."""
    radians = math.radians(angle)
    return math.cos(radians), math.sin(radians)


def _bimodal_log_density(x: Tensor, angle: float = 0.0, weight: float = 0.5) -> Tensor:
    """Log-density of ``w N(c, s^2 I) + (1 - w) N(-c, s^2 I)``, with the modes' centre
    ``c = BIMODAL_SHIFT (cos angle, sin angle)`` (``angle`` in degrees),
    ``s = BIMODAL_SCALE`` and ``w = weight``."""
    centre = BIMODAL_SHIFT * torch.tensor(_bimodal_axis(angle), dtype=x.dtype).to(x.device)
    component = dist.Normal(0.0, BIMODAL_SCALE).expand([2]).to_event(1)
    # log(2w) and log(2(1 - w)) are exactly 0 at w = 1/2: the equal mixture's values
    # are those of its earlier form, logsumexp(...) - log 2, to the bit.
    both = torch.stack(
        [
            component.log_prob(x - centre) + math.log(2 * weight),
            component.log_prob(x + centre) + math.log(2 * (1 - weight)),
        ]
    )
    return torch.logsumexp(both, 0) - math.log(2.0)


def bimodal_model(angle: float = 0.0, weight: float = 0.5) -> None:
    """The 2-D mixture as a model: a ``N(0, I)`` site and a factor to the mixture."""
    prior = dist.Normal(0.0, 1.0).expand([2]).to_event(1)
    x = pyro.sample("x", prior)
    log_density = _bimodal_log_density(x, angle=angle, weight=weight)
    pyro.factor("log_density", log_density - prior.log_prob(x))


SCHOOLS_Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SCHOOLS_SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def schools_centred() -> None:
    """Eight schools, centred: ``theta_j ~ N(mu, tau)``, ``y_j ~ N(theta_j, sigma_j)``."""
    y, sigma = torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def schools_noncentred() -> None:
    """Eight schools, non-centred: ``theta_j = mu + tau eta_j`` with ``eta_j ~ N(0, 1)``."""
    y, sigma = torch.tensor(SCHOOLS_Y), torch.tensor(SCHOOLS_SIGMA)
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


def logistic_data() -> tuple[Tensor, Tensor]:
    """Breast-cancer features (569 x 30, standardised) and labels, from scikit-learn."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels, dtype=torch.float32)


def make_logistic() -> Callable[[], None]:
    features, labels = logistic_data()

    def logistic() -> None:
        """Logistic regression with ``N(0, 1)`` priors on the intercept and 30 weights."""
        x, y = features.to(torch.get_default_dtype()), labels.to(torch.get_default_dtype())
        bias = pyro.sample("bias", dist.Normal(0.0, 1.0))
        weight = pyro.sample("weight", dist.Normal(0.0, 1.0).expand([30]).to_event(1))
        # Vectorized over particles: bias (S, 1), weight (S, 1, 30) -> logits (S, 569).
        logits = bias + (weight * x).sum(-1)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)

    return logistic


RADON_GROUPS = 96


def radon_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Radon-style data: 96 groups of 1 to 12 houses, a floor indicator, log radon.

    Generated from ``seed`` with ``mu_a = 1.5``, ``sigma_a = 0.4``, ``beta = -0.7``,
    ``sigma_y = 0.8``: many small groups, so the group intercepts are weakly identified
    and the centred posterior has the funnel-like coupling to ``sigma_a``.
    """
    # Drawn in float32 whatever the default dtype, so float64 runs see the same data.
    generator, f32 = torch.Generator().manual_seed(seed), torch.float32
    sizes = (
        1 + torch.poisson(torch.full((RADON_GROUPS,), 3.0, dtype=f32), generator=generator).long()
    )
    sizes = sizes.clamp(max=12)
    group = torch.repeat_interleave(torch.arange(RADON_GROUPS), sizes)
    floor = (torch.rand(group.shape, generator=generator, dtype=f32) < 0.3).float()
    intercept = 1.5 + 0.4 * torch.randn(RADON_GROUPS, generator=generator, dtype=f32)
    noise = 0.8 * torch.randn(group.shape, generator=generator, dtype=f32)
    return group, floor, intercept[group] - 0.7 * floor + noise


def make_radon(centred: bool = True) -> Callable[[], None]:
    group, floor, log_radon = radon_data()

    def radon() -> None:
        """``a_j ~ N(mu_a, sigma_a)``, ``y_i ~ N(a_{j[i]} + beta floor_i, sigma_y)``."""
        dtype = torch.get_default_dtype()
        mu_a = pyro.sample("mu_a", dist.Normal(0.0, 5.0))
        sigma_a = pyro.sample("sigma_a", dist.HalfNormal(1.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 5.0))
        sigma_y = pyro.sample("sigma_y", dist.HalfNormal(1.0))
        with pyro.plate("groups", RADON_GROUPS, dim=-1):
            if centred:
                a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
            else:
                eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
                a = mu_a + sigma_a * eta
        mean = a[..., group] + beta * floor.to(dtype)
        with pyro.plate("houses", group.shape[0], dim=-1):
            pyro.sample("y", dist.Normal(mean, sigma_y), obs=log_radon.to(dtype))

    return radon


def _closed_form(problem: Problem, mean: list[float], sd: list[float]) -> Problem:
    problem.mean, problem.sd = torch.tensor(mean), torch.tensor(sd)
    return problem


def make_problems(names: list[str]) -> dict[str, Problem]:
    """The suite's problems by name, with their reference moments."""
    problems: dict[str, Problem] = {}
    for name in names:
        if name == "banana":
            target = known_targets.twisted_gaussian()
            # x1 ~ N(0, 1), x2 = y + x1^2 - 1 with y ~ N(0, 1): Var x2 = 1 + Var(x1^2) = 3.
            problem = _closed_form(
                Problem(name, target.model, 2, target.log_normalizer), [0, 0], [1, 3**0.5]
            )
        elif name == "funnel":
            target = known_targets.funnel(dim=10)
            # v ~ N(0, 9); Var x_i = E[e^v] = e^{9/2}.
            sd = [3.0] + [math.exp(9 / 4)] * 9
            problem = _closed_form(
                Problem(name, target.model, 10, target.log_normalizer), [0.0] * 10, sd
            )
        elif name.partition("@")[0] in ("bimodal", "lopsided"):
            # With d = 2w - 1 (w the +c mode's mass) and u the modes' unit axis:
            # E x_i = shift u_i d, Var x_i = shift^2 u_i^2 (1 - d^2) + scale^2; log Z = 0.
            family, _, turned = name.partition("@")
            angle = float(turned or 0.0)
            weight = LOPSIDED_WEIGHT if family == "lopsided" else 0.5
            skew = 2 * weight - 1
            axis = _bimodal_axis(angle)
            mean = [BIMODAL_SHIFT * u * skew for u in axis]
            sd = [
                math.hypot(BIMODAL_SHIFT * u * math.sqrt(1 - skew**2), BIMODAL_SCALE) for u in axis
            ]
            model = partial(bimodal_model, angle, weight) if angle or skew else bimodal_model
            problem = _closed_form(Problem(name, model, 2, 0.0), mean, sd)
        elif name == "schools_c":
            problem = load_reference(Problem(name, schools_centred, 10))
        elif name == "schools_nc":
            problem = load_reference(Problem(name, schools_noncentred, 10))
        elif name == "logistic":
            problem = load_reference(Problem(name, make_logistic(), 31))
        elif name == "radon":
            problem = load_reference(Problem(name, make_radon(centred=True), RADON_GROUPS + 4))
        else:
            raise ValueError(f"unknown target {name!r}; expected one of {TARGETS}")
        problems[name] = problem
    return problems


TARGETS = ("banana", "funnel", "bimodal", "schools_c", "schools_nc", "logistic", "radon")


def load_reference(problem: Problem) -> Problem:
    """Read the stored NUTS moments (``benchmarks/posteriors/<name>.json``) if present."""
    path = REFERENCE_DIR / f"{problem.name}.json"
    if path.is_file():
        reference = json.loads(path.read_text())
        problem.mean = torch.tensor(reference["mean"])
        problem.sd = torch.tensor(reference["sd"])
        if reference.get("log_z") is not None:
            problem.log_z = reference["log_z"]
    return problem


def unconstrained_flat(model: Callable[[], None], samples: dict[str, Tensor]) -> Tensor:
    """Draws ``{site: (S, *shape)}`` -> ``(S, D)``: each latent site through
    ``biject_to(support).inv``, flattened and concatenated in the model's site order."""
    trace = poutine.trace(model).get_trace()
    columns = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        value = biject_to(site["fn"].support).inv(samples[name])
        columns.append(value.reshape(value.shape[0], -1))
    return torch.cat(columns, -1)


# --------------------------------------------------------------------------------------
# Guides
# --------------------------------------------------------------------------------------


class AutoZukoNSF(AutoContinuous):
    """zuko's neural spline flow over the flat unconstrained latent, through ``ZukoToPyro``.

    ``zuko.flows.NSF(D, transforms=3, hidden_features=(64, 64), passes=2)``: coupling
    passes, so a draw costs one pass per transform (the autoregressive default samples
    in D passes). The base is zuko's ``N(0, I)``, as in Pyro's flow-guide tutorial.
    """

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        import zuko

        super()._setup_prototype(*args, **kwargs)
        self.flow = zuko.flows.NSF(
            self.latent_dim, transforms=3, hidden_features=(64, 64), passes=2
        ).to(torch.get_default_dtype())

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        from pyro.contrib.zuko import ZukoToPyro

        return ZukoToPyro(self.flow())


def guide_factories(flow_options: dict[str, Any]) -> dict[str, Callable]:
    """Every guide of the table by name: ``model -> guide``, Pyro's at their defaults."""
    factories: dict[str, Callable] = {
        "AutoNormal": AutoNormal,
        "AutoMultivariateNormal": AutoMultivariateNormal,
        "AutoIAFNormal": AutoIAFNormal,
        "AutoNormalizingFlow(spline)": lambda model: AutoNormalizingFlow(
            model, partial(T.iterated, 2, T.spline_autoregressive)
        ),
        "zuko NSF": AutoZukoNSF,
    }
    for family in FLOW_BUILDERS:
        options = {k: v for k, v in flow_options.items() if ":" not in k}
        prefix = f"{family}:"
        options.update(
            {k[len(prefix) :]: v for k, v in flow_options.items() if k.startswith(prefix)}
        )
        factories[f"AutoFlow({family})"] = lambda model, family=family, options=options: AutoFlow(
            model, flow=family, **options
        )
    for budget in GUIDE_BUDGETS:  # trained by fit_guide at its own budget (see evaluate)
        factories[f"fit_guide({budget})"] = None
    for family in FLOW_BUILDERS:  # the default budget with another family
        factories[f"fit_guide(default:{family})"] = None
    return factories


PYRO_GUIDES = (
    "AutoNormal",
    "AutoMultivariateNormal",
    "AutoIAFNormal",
    "AutoNormalizingFlow(spline)",
    "zuko NSF",
)


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def make_objective(name: str, particles: int) -> Trace_ELBO | RenyiELBO:
    """``"elbo"`` (``Trace_ELBO``), ``"renyi:ALPHA"`` (``RenyiELBO(alpha)``) or ``"iwae"``
    (``RenyiELBO(alpha=0)``, the importance-weighted bound over the ``particles`` draws)."""
    common = {"num_particles": particles, "vectorize_particles": True, "max_plate_nesting": 1}
    if name == "elbo":
        return Trace_ELBO(**common)
    if name == "iwae":
        return RenyiELBO(alpha=0.0, **common)
    if name.startswith("renyi:"):
        return RenyiELBO(alpha=float(name.partition(":")[2]), **common)
    raise ValueError(f"unknown objective {name!r}; expected 'elbo', 'iwae' or 'renyi:ALPHA'")


def train(problem: Problem, guide: Callable, args: argparse.Namespace) -> tuple[float, bool]:
    """ClippedAdam (lr decayed by 10x over the run) on the vectorized ELBO.

    Returns the seconds spent and whether every loss was finite.
    """
    elbo = make_objective(getattr(args, "objective", "elbo"), args.particles)
    decay = (args.final_lr / args.lr) ** (1.0 / max(args.steps, 1))
    optimizer = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": decay})
    svi = SVI(problem.model, guide, optimizer, elbo)
    anneal, anneal_start = annealing(args)
    start = time.perf_counter()
    for step in range(args.steps):
        beta = annealed_inverse_temperature(step, args.steps, anneal, anneal_start)
        svi.model = temper_likelihood(problem.model, beta)
        loss = svi.step()
        if not math.isfinite(loss):
            return time.perf_counter() - start, False
    return time.perf_counter() - start, True


#: The first inverse temperature of the suite's schedule when ``--anneal`` is given
#: without ``--anneal-start`` (the value its annealing tables were measured with).
ANNEAL_START = 0.1


def annealing(
    args: argparse.Namespace, preset: dict[str, Any] | None = None
) -> tuple[float, float]:
    """``(anneal, anneal_start)`` of one guide's training: ``--anneal`` where given
    (from ``--anneal-start``, else :data:`ANNEAL_START`); without it, a ``fit_guide``
    row's ``preset`` (a :data:`GUIDE_BUDGETS` entry: ``"default"`` anneals a fifth of
    the steps from beta 0.5, ``--anneal-start`` still overriding its start), and no
    annealing for the guides the suite's own SVI loop trains (``preset`` None), as
    Pyro users train them."""
    anneal, start = getattr(args, "anneal", None), getattr(args, "anneal_start", None)
    if anneal is not None:
        return anneal, ANNEAL_START if start is None else start
    if preset is None:
        return 0.0, ANNEAL_START if start is None else start
    return preset["anneal"], preset["anneal_start"] if start is None else start


def train_fit_guide(
    problem: Problem, budget: str, args: argparse.Namespace, flow: str | None = None
) -> tuple[AutoFlow, float, bool]:
    """``pyro_nf.infer.fit_guide`` at a budget preset (its own steps, particles, lr and
    gradient), with the preset's family unless ``flow`` names another;
    ``--budget-steps``, ``--anneal``, ``--anneal-start`` and ``--gradient-clip`` override
    the preset's steps, annealing and clamp, ``--fit-guide-option`` adds to (or
    overrides) the preset's flow options, and ``--fit-guide-arg`` gives any other
    keyword argument of ``fit_guide`` (over all of these)."""
    start = time.perf_counter()
    try:
        anneal, anneal_start = annealing(args, GUIDE_BUDGETS[budget])
        options = getattr(args, "fit_guide_option", [])
        flow_options = {**GUIDE_BUDGETS[budget]["flow_options"]}
        flow_options.update(parse_option(text) for text in options)
        arguments = {
            "budget": budget,
            "flow": flow,
            "flow_options": flow_options,
            "steps": args.budget_steps,
            "anneal": anneal,
            "anneal_start": anneal_start,
            "gradient_clip": getattr(args, "gradient_clip", None),
            "max_plate_nesting": 1,
        }
        arguments.update(parse_option(text) for text in getattr(args, "fit_guide_arg", []))
        guide = fit_guide(problem.model, **arguments)
    except NonFiniteLossError as error:
        return error.guide, time.perf_counter() - start, False
    return guide, time.perf_counter() - start, True


def raw_moments(draws: Tensor, weights: Tensor) -> dict[str, list[float]]:
    """Plain and PSIS-weighted means and sds of the draws (lists, for JSON)."""
    draws, w = draws.double(), weights.double()[:, None]
    mean_w = (w * draws).sum(0)
    return {
        "mean": draws.mean(0).tolist(),
        "sd": draws.std(0).tolist(),
        "mean_psis": mean_w.tolist(),
        "sd_psis": (w * (draws - mean_w) ** 2).sum(0).sqrt().tolist(),
    }


def score(rows: list[dict], problems: dict[str, Problem]) -> list[dict]:
    """Set ``err`` (mean ``|E_q - E| / sd``) and ``lsd`` (mean ``log(sd_q / sd)``),
    plain and PSIS-weighted, of rows from their stored moments and the reference."""
    for row in rows:
        problem = problems.get(row["target"])
        moments = row.get("moments")
        if problem is None or problem.mean is None or moments is None:
            continue
        true_mean, true_sd = problem.mean.double(), problem.sd.double()
        for suffix, mean_key, sd_key in (("", "mean", "sd"), ("_psis", "mean_psis", "sd_psis")):
            mean = torch.tensor(moments[mean_key], dtype=torch.float64)
            sd = torch.tensor(moments[sd_key], dtype=torch.float64)
            row["err" + suffix] = float(((mean - true_mean).abs() / true_sd).mean())
            row["lsd" + suffix] = float((sd / true_sd).log().mean())
    return rows


def exact_traces(guide: Callable) -> None:
    """Score a CNF guide with the exact divergence (it may train with Hutchinson's)."""
    if isinstance(guide, torch.nn.Module):
        for module in guide.modules():
            if isinstance(module, ContinuousFlow):
                module.trace = "exact"


def evaluate(problem: Problem, guide_name: str, make_guide: Callable, args) -> dict:
    """Train one guide on one problem from ``args.seed`` and score it."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    row: dict[str, Any] = {"target": problem.name, "guide": guide_name}
    try:
        if guide_name.startswith("fit_guide("):  # fit_guide(budget) or (budget:family)
            budget, _, family = guide_name[len("fit_guide(") : -1].partition(":")
            guide, seconds, finite = train_fit_guide(problem, budget, args, family or None)
        else:
            guide = make_guide(problem.model)
            seconds, finite = train(problem, guide, args)
    except (ValueError, RuntimeError) as error:  # a guide that cannot train here
        row.update(status=f"error: {str(error)[:80]}")
        return row
    row["seconds"] = seconds
    if not finite:
        row.update(status="NaN loss")
        return row
    exact_traces(guide)
    with torch.no_grad():
        try:
            result = psis_diagnostic(
                problem.model,
                guide,
                num_samples=args.eval_samples,
                batch_size=1000,
                max_plate_nesting=1,
            )
        except ValueError as error:
            row.update(status=f"eval: {str(error)[:60]}")
            return row
    row.update(status="ok", elbo=result.elbo, khat=result.khat)
    if problem.log_z is not None:
        row["kl"] = problem.log_z - result.elbo
    # The guide's moments are kept, so a table can be rescored against a newer reference.
    draws = unconstrained_flat(problem.model, result.samples)
    row["moments"] = raw_moments(draws, result.smoothed_log_weights.exp())
    return score([row], {problem.name: problem})[0]


COLUMNS = [
    ("guide", "{:<28}", "guide"),
    ("elbo", "{:>10.2f}", "ELBO"),
    ("kl", "{:>8.3f}", "KL"),
    ("err", "{:>7.3f}", "err"),
    ("lsd", "{:>7.3f}", "lsd"),
    ("err_psis", "{:>8.3f}", "err_psis"),
    ("khat", "{:>6.2f}", "k-hat"),
    ("seconds", "{:>8.1f}", "time (s)"),
]


def format_row(row: dict) -> str:
    cells = []
    for key, fmt, _ in COLUMNS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            width = int(fmt[fmt.index(">") + 1 : fmt.index(".")]) if ">" in fmt else 0
            cells.append("-".rjust(width) if key != "guide" else fmt.format(row[key]))
        else:
            cells.append(fmt.format(value))
    line = " ".join(cells)
    if row.get("status", "ok") != "ok":
        line += f"  [{row['status']}]"
    return line


def markdown_table(rows: list[dict]) -> str:
    """The rows as one Markdown table per target (for the docs)."""
    lines = []
    for target in dict.fromkeys(row["target"] for row in rows):
        lines += [f"\n**{target}**\n", "| " + " | ".join(c[2] for c in COLUMNS) + " |"]
        lines.append("|" + "---|" * len(COLUMNS))
        for row in (r for r in rows if r["target"] == target):
            cells = []
            for key, fmt, _ in COLUMNS:
                value = row.get(key)
                if key == "guide":
                    cells.append(
                        value + ("" if row.get("status") == "ok" else f" ({row['status']})")
                    )
                elif value is None or (isinstance(value, float) and math.isnan(value)):
                    cells.append("–")
                else:
                    cells.append(fmt.format(value).strip())
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_header(problem: Problem) -> None:
    missing = "" if problem.mean is not None else " (no reference moments stored)"
    print(f"\n{problem.name} (D={problem.dim}){missing}")
    print(" ".join(re.sub(r"\.\d[a-z]", "", fmt).format(h) for _, fmt, h in COLUMNS))


def print_table(rows: list[dict], problems: dict[str, Problem]) -> None:
    for name, problem in problems.items():
        print_header(problem)
        for row in rows:
            if row["target"] == name:
                print(format_row(row))


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``init_scale=1.0``, ``hidden_dims=(32,)``)."""
    import ast

    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--guides", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--final-lr", type=float, default=1e-3)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument(
        "--objective",
        default="elbo",
        help="training objective: elbo (default), iwae, or renyi:ALPHA (Pyro's RenyiELBO)",
    )
    parser.add_argument(
        "--anneal",
        type=float,
        default=None,
        help="train on the tempered likelihood p(y | z)^beta for this fraction of the steps, "
        "beta rising linearly from --anneal-start to 1 (pyro_nf.infer.temper_likelihood), "
        "every guide, fit_guide's too; default: none for the guides of the suite's SVI "
        "loop, the preset's for fit_guide (default: a fifth of the steps from beta 0.5)",
    )
    parser.add_argument(
        "--anneal-start",
        type=float,
        default=None,
        help=f"default: {ANNEAL_START} with --anneal, else a fit_guide preset's",
    )
    parser.add_argument("--eval-samples", type=int, default=4000)
    parser.add_argument(
        "--budget-steps",
        type=int,
        default=None,
        help="steps of the fit_guide(<budget>) guides (default: the preset's)",
    )
    parser.add_argument(
        "--gradient-clip",
        type=float,
        default=None,
        help="clamp of each gradient element of the fit_guide(<budget>) guides, inf: none "
        "(default: the preset's; default 10, as Pyro's ClippedAdam, high none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="train in double precision")
    parser.add_argument(
        "--flow-option",
        action="append",
        default=[],
        help="key=value passed to every AutoFlow (repeatable), e.g. init_scale=1.0",
    )
    parser.add_argument(
        "--fit-guide-option",
        action="append",
        default=[],
        help="key=value added to the fit_guide(<budget>) rows' flow options (repeatable; "
        "over the preset's), e.g. components=2",
    )
    parser.add_argument(
        "--fit-guide-arg",
        action="append",
        default=[],
        help="key=value, a keyword argument of fit_guide for the fit_guide(<budget>) rows "
        "(repeatable; over the preset's and the flags above), e.g. "
        "hold_weights_while_annealing=False",
    )
    parser.add_argument("--output", default=None, help="write the rows to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--quick", action="store_true", help="tiny budget, a smoke test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--rescore",
        nargs="+",
        default=None,
        help="print the table of stored rows (JSON files of --output) scored against the "
        "current references, instead of training",
    )
    args = parser.parse_args(argv)
    if args.rescore:
        rows = [row for path in args.rescore for row in json.loads(Path(path).read_text())]
        problems = make_problems(list(dict.fromkeys(row["target"] for row in rows)))
        rows = score(rows, problems)
        print_table(rows, problems)
        print(markdown_table(rows))
        return rows
    if args.quick:
        args.steps, args.eval_samples = 5, 50
        args.budget_steps = args.budget_steps or 5
    torch.set_num_threads(args.threads)
    if args.float64:
        torch.set_default_dtype(torch.float64)
    flow_options = dict(parse_option(text) for text in args.flow_option)
    if args.quick:
        flow_options.setdefault("hidden_dims", (8,))
    factories = guide_factories(flow_options)
    default_names = [name for name in factories if not name.startswith("fit_guide(")]
    names = default_names if args.guides is None else args.guides.split(",")
    unknown = [name for name in names if name not in factories]
    if unknown:
        raise ValueError(f"unknown guides {unknown}; expected some of {list(factories)}")
    problems = make_problems(args.targets.split(","))
    anneal, anneal_start = annealing(args)
    schedule = f"{anneal}@{anneal_start}"
    if args.anneal is None:  # the fit_guide rows anneal as their preset says
        schedule += " (fit_guide rows: their preset's)"
    print(
        f"steps={args.steps} lr={args.lr}->{args.final_lr} particles={args.particles} "
        f"objective={args.objective} anneal={schedule} "
        f"eval samples={args.eval_samples} seed={args.seed} AutoFlow options={flow_options}"
        + (f" fit_guide options={args.fit_guide_option}" if args.fit_guide_option else "")
        + (f" fit_guide arguments={args.fit_guide_arg}" if args.fit_guide_arg else "")
    )
    rows = []
    for problem in problems.values():
        print_header(problem)
        for name in names:
            row = evaluate(problem, name, factories[name], args)
            rows.append(row)
            print(format_row(row), flush=True)
            if args.output:  # after every row, so a long run that is stopped keeps its rows
                Path(args.output).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
