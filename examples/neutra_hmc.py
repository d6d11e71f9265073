"""NeuTra HMC: NUTS on Neal's funnel, reparametrized by a trained flow guide, vs plain NUTS.

NeuTra (neural transport) first fits a flow guide ``q = T(N(0, I))`` by SVI, then runs
HMC on the *base* variable ``u`` with the pulled-back density
``p(T(u)) |det dT/du|``. Where the guide is close to the posterior, that density is
close to a standard normal: the funnel's neck, where plain NUTS needs tiny steps and
diverges, is stretched out by the flow. Pyro's ``NeuTraReparam`` does the change of
variables; :class:`pyro_nf.infer.AutoFlow` provides ``get_transform``.

Reported for plain NUTS and NeuTra NUTS: bulk ESS of the funnel's scale variable ``v``
and the minimum over all coordinates, per second of sampling; the number of
divergent transitions; the mean and standard deviation of ``v`` (exact: 0 and 3).
Figure: ``neutra_funnel.png``, draws of ``(x1, v)`` with divergences marked.

Run::

    python examples/neutra_hmc.py
    python examples/neutra_hmc.py --flow realnvp --num-samples 2000
    python examples/neutra_hmc.py --quick        # a smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.reparam import NeuTraReparam
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    base_parser,
    format_table,
    output_directory,
    progress_enabled,
    write_json,
)
from svi_guides import (  # noqa: E402
    add_guide_arguments,
    funnel_draws,
    make_guide,
    make_problem,
    train,
)

from pyro_nf.flows import FLOW_BUILDERS  # noqa: E402

FLOWS = tuple(FLOW_BUILDERS)


def run_nuts(model: object, args: argparse.Namespace, label: str) -> tuple[MCMC, float]:
    """NUTS on ``model``; returns the sampler and its wall-clock seconds (warm-up included)."""
    pyro.set_rng_seed(args.seed)
    kernel = NUTS(model, max_tree_depth=args.max_tree_depth)
    mcmc = MCMC(
        kernel,
        num_samples=args.num_samples,
        warmup_steps=args.warmup,
        disable_progbar=not progress_enabled(args),
    )
    start = time.perf_counter()
    mcmc.run()
    return mcmc, time.perf_counter() - start


def divergent_indices(mcmc: MCMC) -> list[int]:
    """Indices of the post-warm-up draws whose transitions diverged."""
    divergences = mcmc.diagnostics().get("divergences", {})
    return [int(i) for chain in divergences.values() for i in chain]


def chain_statistics(draws: Tensor, seconds: float, divergent: list[int]) -> dict:
    """ESS (bulk) of ``v`` and the minimum over coordinates, per second, and divergences."""
    array = draws.detach().cpu().numpy()[None]  # (chain, draw, dim)
    ess = az.ess(az.convert_to_dataset({"x": array}))["x"].values
    return {
        "seconds": seconds,
        "ESS v": float(ess[0]),
        "ESS min": float(np.min(ess)),
        "ESS v / s": float(ess[0]) / seconds,
        "ESS min / s": float(np.min(ess)) / seconds,
        "divergences": len(divergent),
        "mean v": float(array[0, :, 0].mean()),
        "sd v": float(array[0, :, 0].std()),
    }


def plot(draws: dict[str, tuple[Tensor, list[int]]], exact: Tensor, path: Path) -> None:
    figure, axes = plt.subplots(1, len(draws), figsize=(3.2 * len(draws), 3.0), sharey=True)
    for ax, (label, (points, divergent)) in zip(np.atleast_1d(axes), draws.items(), strict=True):
        ax.scatter(exact[:, 1], exact[:, 0], s=1, c="0.8", label="exact")
        ax.scatter(points[:, 1], points[:, 0], s=2, c="C0", label="NUTS draws")
        if divergent:
            bad = points[divergent]
            ax.scatter(bad[:, 1], bad[:, 0], s=8, c="C3", label="divergent")
        ax.set_title(f"{label}: {len(divergent)} divergences", fontsize=9)
        ax.set_xlabel("x1", fontsize=8)
        ax.set_xlim(-20, 20)
        ax.set_ylim(-9, 9)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("v", fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left", markerscale=3)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--flow", choices=FLOWS, default="iaf", help="the guide's flow family")
    parser.add_argument("--funnel-dim", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2000, help="SVI steps of the guide")
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    # 1.0, not AutoFlow's 1/8: at this example's budget the shorter first Adam steps
    # leave curvature in the funnel's neck that costs NUTS 30-45% of its ESS per second
    # (docs/examples/neutra-hmc.md).
    add_guide_arguments(parser, final_multiplier=1.0)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--max-tree-depth", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.particles, args.flow_layers, args.hidden = 5, 2, 2, 8
        args.warmup, args.num_samples, args.max_tree_depth = 10, 20, 5
    args.lrd = 0.1 ** (1.0 / args.steps)
    args.num_draws = 2000
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the table rows and the paths it wrote."""
    args = parse_args(argv)
    directory = output_directory(args.output_dir, "neutra_hmc")
    problem = make_problem("funnel", args)
    exact = funnel_draws(args.num_draws, args.funnel_dim, torch.Generator().manual_seed(1))
    rows, draws = [], {}

    plain, seconds = run_nuts(problem.model, args, "NUTS")
    divergent = divergent_indices(plain)
    samples = plain.get_samples()["x"]
    rows.append({"sampler": "NUTS", **chain_statistics(samples, seconds, divergent)})
    draws["NUTS"] = (samples, divergent)

    flow = args.flow
    guide = make_guide(f"AutoFlow-{flow}", problem.model, args)
    train_seconds = train(guide, problem, args, f"guide {flow}")
    neutra = NeuTraReparam(guide.requires_grad_(False))
    model = poutine.reparam(problem.model, config={"x": neutra})
    mcmc, seconds = run_nuts(model, args, f"NeuTra-{flow}")
    divergent = divergent_indices(mcmc)
    samples = neutra.transform_sample(mcmc.get_samples()["x_shared_latent"])["x"]
    label = f"NeuTra NUTS ({flow})"
    statistics = chain_statistics(samples, seconds, divergent)
    rows.append({"sampler": label, **statistics, "guide seconds": train_seconds})
    draws[label] = (samples, divergent)

    columns = ["sampler", "seconds", "ESS v", "ESS min", "ESS v / s", "ESS min / s"]
    columns += ["divergences", "mean v", "sd v"]
    print(f"\n[neutra] funnel (dim {args.funnel_dim}; exact mean v = 0, sd v = 3):")
    print(format_table(rows, columns))
    path = directory / "neutra_funnel.png"
    plot(draws, exact, path)
    results = {"rows": rows, "args": vars(args)}
    write_json(directory / "results.json", results)
    finite = all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    return {**results, "files": [str(path)], "all_finite": finite, "output_dir": str(directory)}


if __name__ == "__main__":
    main()
