"""SVI steps with AutoFlow against Pyro's flow autoguides of the same architecture.

One ``svi.step`` (``Trace_ELBO`` with 8 vectorized particles, Adam) on a model with D
latents, for D = 2, 10, 100 and 1000, timed side by side, round by round:

- ``AutoFlow(flow="iaf")`` against Pyro's ``AutoIAFNormal`` and against
  ``AutoNormalizingFlow`` with ``iterated(L, affine_autoregressive)`` (both L affine
  autoregressive layers on ``AutoRegressiveNN`` of the same hidden sizes); the
  default's spline layers between affine ones are timed beside the same architecture
  as Pyro's, ``coupling_function="affine"`` with Pyro's (total) gradient (with the
  triangular and the diagonal affine layer), and with the path gradient, the default
  from 17 to 100 latents;
- ``AutoFlow(flow="realnvp")`` (its default, and its affine couplings alone) against
  ``AutoNormalizingFlow`` with ``iterated(L, affine_coupling)`` (D >= 2).

Architecture: L = 5 layers; two hidden layers of ``max(64, 2D)`` units (a MADE needs
hidden layers at least as wide as D - 1 for every output to depend on its
predecessors; Pyro warns below that). float32, one thread.

The model: ``z ~ N(0, I_D)`` and ``y ~ N(A z, 1)`` with 2D observations and a fixed
random ``A``, so the posterior is correlated and every latent is used.

    python benchmarks/svi_steps.py --threads 1 --rounds 10 --min-run-time 0.3   # the docs' table
    python benchmarks/svi_steps.py --quick                      # a smoke test
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoNormalizingFlow
from pyro.optim import Adam
from timing import common_arguments, parse_arguments, time_alternating

from pyro_nf.infer import AutoFlow

NUM_LAYERS = 5
PARTICLES = 8


def linear_gaussian_model(dim: int) -> tuple[Callable[[], None], torch.Tensor]:
    generator = torch.Generator().manual_seed(dim)
    design = torch.randn(2 * dim, dim, generator=generator) / dim**0.5
    observed = design @ torch.randn(dim, generator=generator)

    def model() -> None:
        z = pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z @ design.T, 1.0).to_event(1), obs=observed)

    return model, observed


def hidden_sizes(dim: int) -> list[int]:
    return [max(64, 2 * dim)] * 2


def svi_step(model: Callable[[], None], guide: Callable[..., object]) -> Callable[[], float]:
    """A ready SVI whose ``step`` is timed: the prototype and optimizer state exist."""
    svi = SVI(
        model,
        guide,
        Adam({"lr": 1e-3}),
        Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True),
    )
    svi.step()
    return svi.step


def _named(name: str) -> type[AutoFlow]:
    """``AutoFlow`` under another class name, so that its parameters get their own names
    in the param store beside the other ``AutoFlow`` columns of a row."""
    return type(name, (AutoFlow,), {})


def guides(dim: int, model: Callable[[], None]) -> dict[str, dict[str, Callable[[], Callable]]]:
    """``{row: {column: guide builder}}``."""
    hidden = hidden_sizes(dim)

    def iaf_guide(name: str, **options: object) -> Callable[[], Callable]:
        return lambda: _named(name)(
            model, flow="iaf", num_layers=NUM_LAYERS, hidden_dims=hidden, **options
        )

    builders: dict[str, dict[str, Callable[[], Callable]]] = {
        f"iaf D={dim}": {
            # The default (up to 16 latents: spline layers between affine ones; from 17
            # to 100 the path gradient), then Pyro's architecture and gradient (affine
            # layers only, the total gradient) with the default's triangular affine
            # layer (a D x D product) and with the diagonal one, and that architecture
            # with the path gradient (D sequential passes per layer to score a draw).
            "AutoFlow(iaf)": iaf_guide("AutoFlow"),
            "AutoFlow(iaf, affine)": iaf_guide(
                "AutoFlowAffine", coupling_function="affine", gradient="total"
            ),
            "AutoFlow(iaf, affine, diagonal)": iaf_guide(
                "AutoFlowAffineDiagonal",
                coupling_function="affine",
                affine="diagonal",
                gradient="total",
            ),
            "AutoFlow(iaf, affine, path)": iaf_guide(
                "AutoFlowAffinePath", coupling_function="affine", gradient="path"
            ),
            "AutoIAFNormal": lambda: AutoIAFNormal(
                model, hidden_dim=hidden, num_transforms=NUM_LAYERS
            ),
            "AutoNormalizingFlow(affine_autoregressive)": lambda: AutoNormalizingFlow(
                model, partial(T.iterated, NUM_LAYERS, T.affine_autoregressive, hidden_dims=hidden)
            ),
        },
        f"realnvp D={dim}": {
            # No glue layer, as Pyro's stack (AutoFlow's LU default above 16 latents).
            # The default (up to 16 latents a spline pair first and the final
            # multiplier), then Pyro's architecture (affine couplings only).
            "AutoFlow(realnvp)": lambda: AutoFlow(
                model, flow="realnvp", num_layers=NUM_LAYERS, hidden_dims=hidden, permutation=None
            ),
            "AutoFlow(realnvp, affine)": lambda: _named("AutoFlowAffine")(
                model,
                flow="realnvp",
                num_layers=NUM_LAYERS,
                hidden_dims=hidden,
                permutation=None,
                coupling_function="affine",
                final_multiplier=1.0,
            ),
            "AutoNormalizingFlow(affine_coupling)": lambda: AutoNormalizingFlow(
                model, partial(T.iterated, NUM_LAYERS, T.affine_coupling, hidden_dims=hidden)
            ),
        },
    }
    return builders


def ready_steps(model: Callable[[], None], columns: dict[str, Callable]) -> dict[str, Callable]:
    """Build a row's guides in a fresh param store (their names differ) and their steps."""
    pyro.clear_param_store()
    steps = {}
    for name, build in columns.items():
        torch.manual_seed(0)
        steps[name] = svi_step(model, build())
    return steps


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 100, 1000])
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parse_arguments(parser)
    logging.getLogger("pyro").setLevel(logging.WARNING)  # one line per guide setup
    rounds = max(args.rounds, 1)
    if args.quick:
        args.dims, args.min_run_time = [2, 3], 0.01
    print(
        f"SVI steps: {NUM_LAYERS} layers, hidden max(64, 2D) x 2, {PARTICLES} vectorized "
        f"particles, float32, {torch.get_num_threads()} threads, {rounds} rounds"
    )
    results = {}
    for dim in args.dims:
        model, _ = linear_gaussian_model(dim)
        for label, builders in guides(dim, model).items():
            columns = ready_steps(model, builders)
            times = time_alternating(columns, rounds, args.min_run_time)
            best = {name: min(seconds) for name, seconds in times.items()}
            ours = [name for name in columns if name.startswith("AutoFlow")]
            peers = [name for name in columns if name not in ours]
            fastest = min(peers, key=lambda name: best[name])
            results[label] = {"ms": {name: 1e3 * s for name, s in best.items()}, "ratios": {}}
            for name in ours:
                per_round = [
                    times[name][k] / min(times[p][k] for p in peers) for k in range(rounds)
                ]
                results[label]["ratios"][name] = {
                    "x_fastest_pyro": best[name] / best[fastest],
                    "range": [min(per_round), max(per_round)],
                    "fastest_pyro": fastest,
                }
            cells = "  ".join(f"{name} {1e3 * best[name]:.2f} ms" for name in columns)
            ratios = "  ".join(
                f"{name} {r['x_fastest_pyro']:.2f} ({r['range'][0]:.2f}-{r['range'][1]:.2f})"
                for name, r in results[label]["ratios"].items()
            )
            print(f"{label:<16} {cells}  vs {fastest}: {ratios}", flush=True)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
