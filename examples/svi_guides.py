"""Flow autoguides for SVI: banana, Neal's funnel and Bayesian logistic regression.

Each model is fitted with Pyro's ``AutoNormal`` and ``AutoMultivariateNormal`` and
with :class:`pyro_nf.infer.AutoFlow` for every flow family, at the same
number of SVI steps. Reported per guide:

- the ELBO (and, where the normalizer ``log Z`` is known, ``KL(q || p) = log Z - ELBO``);
- the PSIS diagnostic: Pareto k-hat of the importance weights ``p(x, z) / q(z)``
  (k-hat < 0.7: the guide is usable for importance sampling) and the importance-sampling
  estimate of ``log p(x)``;
- an ArviZ summary of the guide's draws (the full tables are saved as CSV).

Figures: ``pairs_<model>.png``, one panel of guide draws per guide (the exact
posterior's draws in grey where they are known).

Run::

    python examples/svi_guides.py
    python examples/svi_guides.py --models funnel --families iaf realnvp
    python examples/svi_guides.py --components 2 --families iaf   # two flows, learned weights
    python examples/svi_guides.py --quick        # a smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.optim import ClippedAdam
from torch import Tensor
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arviz as az  # noqa: E402
from common import (  # noqa: E402
    base_parser,
    format_table,
    output_directory,
    progress_enabled,
    write_json,
)

from pyro_nf.flows import FLOW_BUILDERS  # noqa: E402
from pyro_nf.infer import (  # noqa: E402
    AutoFlow,
    annealed_inverse_temperature,
    elbo_for_guide,
    psis_diagnostic,
    targets,
    temper_likelihood,
    to_inference_data,
)
from pyro_nf.infer.autoguide import GUIDE_FINAL_MULTIPLIER_FAMILIES  # noqa: E402

MODELS = ("banana", "funnel", "logistic")
FAMILIES = tuple(FLOW_BUILDERS)


@dataclass
class Problem:
    """A model, its arguments, the two coordinates to plot and exact draws if known."""

    name: str
    model: Callable[..., None]
    args: tuple
    coordinates: tuple[tuple[str, int], tuple[str, int]]
    labels: tuple[str, str]
    log_normalizer: float = math.nan
    exact_draws: Tensor | None = None


def banana_draws(num: int, generator: torch.Generator) -> Tensor:
    """Exact draws of ``targets.twisted_gaussian()`` (scale 1, twist 1): ``x2 = y2 + x1^2 - 1``."""
    y = torch.randn(num, 2, generator=generator)
    return torch.stack([y[:, 0], y[:, 1] + (y[:, 0] ** 2 - 1.0)], -1)


def funnel_draws(num: int, dim: int, generator: torch.Generator) -> Tensor:
    """Exact draws of ``targets.funnel(dim)``: ``v ~ N(0, 9)``, ``x_i ~ N(0, e^v)``."""
    v = 3.0 * torch.randn(num, 1, generator=generator)
    return torch.cat([v, torch.randn(num, dim - 1, generator=generator) * (0.5 * v).exp()], -1)


def logistic_regression(features: Tensor, labels: Tensor | None = None) -> None:
    """``w ~ N(0, I)``, ``b ~ N(0, 5^2)``, ``y_n ~ Bernoulli(sigmoid(x_n . w + b))``."""
    weights = pyro.sample(
        "w", dist.Normal(features.new_zeros(()), 1.0).expand([features.shape[-1]]).to_event(1)
    )
    bias = pyro.sample("b", dist.Normal(features.new_zeros(()), 5.0))
    # Written to broadcast over leading particle dimensions of w and b.
    logits = (features * weights).sum(-1) + bias
    with pyro.plate("data", features.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=labels)


def breast_cancer() -> tuple[Tensor, Tensor]:
    """scikit-learn's breast-cancer data (569 x 30, embedded), standardized features."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    features = torch.as_tensor(data.data, dtype=torch.get_default_dtype())
    features = (features - features.mean(0)) / features.std(0)
    return features, torch.as_tensor(data.target, dtype=features.dtype)


def make_problem(name: str, args: argparse.Namespace) -> Problem:
    generator = torch.Generator().manual_seed(args.seed)
    if name == "banana":
        target = targets.twisted_gaussian()
        return Problem(
            name,
            target.model,
            (),
            (("x", 0), ("x", 1)),
            ("x1", "x2"),
            target.log_normalizer,
            banana_draws(args.num_draws, generator),
        )
    if name == "funnel":
        target = targets.funnel(dim=args.funnel_dim)
        draws = funnel_draws(args.num_draws, args.funnel_dim, generator)
        return Problem(
            name,
            target.model,
            (),
            (("x", 1), ("x", 0)),
            ("x1", "v"),
            target.log_normalizer,
            draws,
        )
    features, labels = breast_cancer()
    return Problem(
        name, logistic_regression, (features, labels), (("w", 0), ("w", 1)), ("w0", "w1")
    )


def add_guide_arguments(
    parser: argparse.ArgumentParser, final_multiplier: float | None = None
) -> None:
    """The options of the flow guides that :func:`make_guide` reads (each ``None``:
    ``AutoFlow``'s default), and the annealing that :func:`train` reads;
    ``final_multiplier`` is the example's own default for ``--final-multiplier``."""
    parser.add_argument(
        "--flow-layers", type=int, default=None, help="flow layers (default: AutoFlow's)"
    )
    parser.add_argument(
        "--hidden", type=int, default=None, help="conditioner width (default: AutoFlow's)"
    )
    parser.add_argument(
        "--final-multiplier",
        type=float,
        default=final_multiplier,
        help="iaf/maf/realnvp conditioners' final_multiplier (default: "
        + (
            "AutoFlow's, 1/8 up to 16 latents"
            if final_multiplier is None
            else f"{final_multiplier}"
        )
        + ")",
    )
    parser.add_argument(
        "--anneal",
        type=float,
        default=0.0,
        help="fraction of the steps on the tempered likelihood p(y | z)^beta, beta rising "
        "linearly from --anneal-start to 1 (0: none; 0.5 for a posterior with several modes)",
    )
    parser.add_argument("--anneal-start", type=float, default=0.1)


def make_guide(kind: str, model: Callable[..., None], args: argparse.Namespace) -> object:
    if kind == "AutoNormal":
        return AutoNormal(model, init_scale=0.1)
    if kind == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model, init_scale=0.1)
    # The named family, so the guide gets AutoFlow's defaults (chosen on the posterior
    # suite); --flow-layers, --hidden and --final-multiplier override them when given.
    family = kind.removeprefix("AutoFlow-")
    options: dict[str, object] = {}
    # --flow-layers counts the discrete flows' layers; a CNF guide keeps AutoFlow's
    # number of ODE blocks (one, two above 16 latents).
    if args.flow_layers is not None and family != "cnf":
        options["num_layers"] = args.flow_layers
    if args.hidden is not None:
        options["hidden_dims"] = (args.hidden,) * 2
    if args.final_multiplier is not None and family in GUIDE_FINAL_MULTIPLIER_FAMILIES:
        options["final_multiplier"] = args.final_multiplier
    components = getattr(args, "components", 1)
    if components > 1:  # a mixture of flows whose weights MixtureELBO learns
        options.update(components=components, mixture_weights="learned")
    return AutoFlow(model, flow=family, **options)


def train(guide: object, problem: Problem, args: argparse.Namespace, label: str) -> float:
    """SVI with the loss ``elbo_for_guide`` picks: a vectorized ``Trace_ELBO``, or
    ``MixtureELBO`` for a guide whose mixture weights are learned (this script's guides
    of several flows); returns the training seconds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    elbo = elbo_for_guide(guide, args.particles, max_plate_nesting=1)
    svi = SVI(problem.model, guide, ClippedAdam({"lr": args.lr, "lrd": args.lrd}), elbo)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=label, leave=False, disable=not progress_enabled(args))
    for step in bar:
        beta = annealed_inverse_temperature(step, args.steps, args.anneal, args.anneal_start)
        svi.model = temper_likelihood(problem.model, beta)
        loss = svi.step(*problem.args)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{label}: the loss became {loss} at step {step}")
        if step % 50 == 0:
            bar.set_postfix(neg_elbo=f"{loss:.2f}")
    return time.perf_counter() - start


def guide_draws(idata: object, coordinates: tuple[tuple[str, int], ...]) -> Tensor:
    """The plotted coordinates of the guide's draws, shape ``(S, 2)``."""
    columns = []
    for site, index in coordinates:
        values = torch.as_tensor(idata.posterior[site].values[0])
        columns.append(
            values.reshape(values.shape[0], -1)[:, index] if values.dim() > 1 else values
        )
    return torch.stack(columns, -1)


def plot_pairs(problem: Problem, draws: dict[str, Tensor], path: Path) -> None:
    figure, axes = plt.subplots(
        1, len(draws), figsize=(2.4 * len(draws), 2.6), squeeze=False, sharex=True, sharey=True
    )
    reference = None
    if problem.exact_draws is not None:
        reference = problem.exact_draws[:, [index for _, index in problem.coordinates]]
    for ax, (label, points) in zip(axes[0], draws.items(), strict=True):
        if reference is not None:
            ax.scatter(reference[:, 0], reference[:, 1], s=1, c="0.75", label="exact")
        ax.scatter(points[:, 0], points[:, 1], s=1, c="C0", alpha=0.6)
        ax.set_title(label.replace("AutoMultivariateNormal", "AutoMVN"), fontsize=8)
        ax.set_xlabel(problem.labels[0], fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel(problem.labels[1], fontsize=8)
    if problem.name == "funnel":
        axes[0, 0].set_xlim(-15, 15)
        axes[0, 0].set_ylim(-9, 9)
    elif problem.name == "banana":
        axes[0, 0].set_xlim(-4, 4)
        axes[0, 0].set_ylim(-3, 10)
    figure.suptitle(f"{problem.name}: guide draws", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--particles", type=int, default=8, help="ELBO particles per step")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--lrd", type=float, default=None, help="learning-rate decay per step")
    add_guide_arguments(parser)
    parser.add_argument("--funnel-dim", type=int, default=10)
    parser.add_argument("--num-draws", type=int, default=2000, help="draws for PSIS and plots")
    parser.add_argument(
        "--components",
        type=int,
        default=1,
        help="flows per AutoFlow guide; above 1 a mixture with learned weights, trained "
        "by MixtureELBO (for a posterior with several modes)",
    )
    args = parser.parse_args(argv)
    if args.components < 1:
        parser.error(f"--components must be a positive integer, got {args.components}")
    if args.quick:
        args.steps, args.particles, args.num_draws = 5, 2, 64
        args.flow_layers, args.hidden = 2, 8
    if args.lrd is None:  # decay the learning rate tenfold over the run
        args.lrd = 0.1 ** (1.0 / args.steps)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the table rows and the paths it wrote."""
    args = parse_args(argv)
    directory = output_directory(args.output_dir, "svi_guides")
    guides = ["AutoNormal", "AutoMultivariateNormal"]
    guides += [f"AutoFlow-{family}" for family in args.families]

    rows, files = [], []
    for name in args.models:
        problem = make_problem(name, args)
        draws = {}
        for kind in guides:
            label = f"{name}/{kind}"
            guide = make_guide(kind, problem.model, args)
            seconds = train(guide, problem, args, label)
            row = {"model": name, "guide": kind, "train seconds": seconds}
            if AutoFlow is not None:
                pyro.set_rng_seed(args.seed)
                with torch.no_grad():
                    psis = psis_diagnostic(
                        problem.model,
                        guide,
                        *problem.args,
                        num_samples=args.num_draws,
                        max_plate_nesting=1,
                    )
                    idata = to_inference_data(
                        problem.model,
                        guide,
                        *problem.args,
                        num_samples=args.num_draws,
                        max_plate_nesting=1,
                    )
                row.update(
                    {
                        "ELBO": psis.elbo,
                        "KL(q||p)": problem.log_normalizer - psis.elbo,
                        "PSIS log Z": psis.log_evidence,
                        "k-hat": psis.khat,
                    }
                )
                summary = az.summary(idata, kind="stats")
                summary_path = directory / f"summary_{name}_{kind}.csv"
                summary.to_csv(summary_path)
                files.append(summary_path)
                print(
                    f"\n[svi] {label}: ArviZ summary (first rows; full table in {summary_path.name})"
                )
                print(summary.head(4).to_string())
                draws[kind] = guide_draws(idata, problem.coordinates)
            else:
                loss = Trace_ELBO(
                    num_particles=args.num_draws, vectorize_particles=True, max_plate_nesting=1
                ).loss
                row["ELBO"] = -loss(problem.model, guide, *problem.args)
            rows.append(row)
        if draws:
            path = directory / f"pairs_{name}.png"
            plot_pairs(problem, draws, path)
            files.append(path)

    columns = ["model", "guide", "ELBO", "KL(q||p)", "PSIS log Z", "k-hat", "train seconds"]
    print("\n[svi] ELBO, KL to the exact posterior (known log Z only) and PSIS k-hat:")
    print(format_table(rows, columns))
    results = {"rows": rows, "args": vars(args)}
    write_json(directory / "results.json", results)
    return {**results, "files": [str(f) for f in files], "output_dir": str(directory)}


if __name__ == "__main__":
    main()
