"""A CNF guide's path-gradient draw: the ODE state alone against the augmented solve.

One ``svi.step`` of a default ``AutoFlow(model, flow="cnf")`` guide (``Trace_ELBO`` with
8 vectorized particles, Adam at 1e-3) on the posterior suite's targets
(``benchmarks/posteriors.py``), after ``--warmup`` steps, timed round by round
(:func:`timing.time_alternating`) with two draws of the same guide:

- ``state-only draw``: what the guide does, ``ContinuousFlow.forward_without_log_det``
  through ``PathDerivativeDistribution.rsample``, a solve of ``dz/dt = f`` alone;
- ``augmented draw (before)``: the draw before it, the solve of the state and its
  log-determinant (the trace of the field's Jacobian at every evaluation), which the
  path gradient never reads; emulated by giving ``PathDerivativeDistribution`` torch's
  ``rsample`` back for those calls.

Both columns step one SVI object, so they time the same parameters, which keep training.

    python benchmarks/cnf_guide_draw.py --threads 1 --rounds 5 --min-run-time 0.5   # the docs' table
    python benchmarks/cnf_guide_draw.py --quick                                     # a smoke test
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from posteriors import make_problems
from svi_steps import PARTICLES, svi_step
from timing import common_arguments, parse_arguments, time_alternating

from pyro_nf.infer import AutoFlow, PathDerivativeDistribution

TARGETS = ("banana", "funnel", "schools_c", "logistic", "radon")
STATE_ONLY = "state-only draw"
AUGMENTED = "augmented draw (before)"


def with_augmented_draw(step: Callable[[], float]) -> Callable[[], float]:
    """``step`` with the path-gradient draw of before: each layer's full forward pass."""
    state_only_rsample = PathDerivativeDistribution.rsample

    def run() -> float:
        PathDerivativeDistribution.rsample = dist.TransformedDistribution.rsample
        try:
            return step()
        finally:
            PathDerivativeDistribution.rsample = state_only_rsample

    return run


def ready_step(model: Callable[[], None], warmup: int) -> Callable[[], float]:
    """The ``step`` of an SVI on a default cnf guide (:func:`svi_steps.svi_step`), after
    ``warmup`` steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    step = svi_step(model, AutoFlow(model, flow="cnf"))
    for _ in range(warmup):
        step()
    return step


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help="posterior suite targets")
    parser.add_argument("--warmup", type=int, default=30, help="SVI steps before timing")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    args = parse_arguments(parser)
    logging.getLogger("pyro").setLevel(logging.WARNING)
    targets = args.targets.split(",")
    if args.quick:
        targets, args.warmup, args.min_run_time = ["banana"], 1, 0.01
    rounds = max(args.rounds, 1)
    print(
        f"cnf guide steps: {PARTICLES} vectorized particles, {torch.get_num_threads()} "
        f"threads, {rounds} rounds"
    )
    print(f"| target (D) | {AUGMENTED} | {STATE_ONLY} | ratio (range over rounds) |")
    print("|---|---|---|---|")
    results = {}
    for name, problem in make_problems(targets).items():
        step = ready_step(problem.model, args.warmup)
        times = time_alternating(
            {AUGMENTED: with_augmented_draw(step), STATE_ONLY: step}, rounds, args.min_run_time
        )
        best = {column: min(seconds) for column, seconds in times.items()}
        per_round = [
            now / before for now, before in zip(times[STATE_ONLY], times[AUGMENTED], strict=True)
        ]
        results[name] = {
            "ms": {column: 1e3 * seconds for column, seconds in best.items()},
            "ratio": best[STATE_ONLY] / best[AUGMENTED],
            "range": [min(per_round), max(per_round)],
        }
        row = results[name]
        print(
            f"| {name} ({problem.dim}) | {row['ms'][AUGMENTED]:.1f} ms | "
            f"{row['ms'][STATE_ONLY]:.1f} ms | {row['ratio']:.2f} "
            f"({row['range'][0]:.2f}-{row['range'][1]:.2f}) |",
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
