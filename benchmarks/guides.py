"""ELBO gap (log Z - ELBO = KL(q || p)) and PSIS k-hat of autoguides on known targets.

Every guide is trained with the same optimizer, learning rate, number of steps and
particles, from the same seed, on the 2-D banana and Neal's funnel (d = 10), whose
normalizers are known (``pyro_nf.infer.targets``). The gap is estimated with
``--eval-samples`` vectorized guide draws, k-hat with as many (``psis_diagnostic``).
Flow families that are not in ``pyro_nf.flows`` yet are listed as missing.

    python benchmarks/guides.py            # full run (a few minutes on 2 cores)
    python benchmarks/guides.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_nf import flows
from pyro_nf.infer import FLOW_FAMILIES, AutoFlow, psis_diagnostic
from pyro_nf.infer.targets import Target, banana, funnel


def guide_factories(args):
    factories = {
        "AutoNormal": lambda model: AutoNormal(model, init_scale=args.init_scale),
        "AutoMultivariateNormal": lambda model: AutoMultivariateNormal(
            model, init_scale=args.init_scale
        ),
    }
    for family in FLOW_FAMILIES:
        if hasattr(flows, family):
            factories[f"AutoFlow({family})"] = lambda model, family=family: AutoFlow(
                model,
                flow=family,
                init_scale=args.init_scale,
                num_layers=args.num_layers,
                hidden_dims=(args.hidden,) * 2,
            )
    return factories


def evaluate(target: Target, make_guide, args) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = make_guide(target.model)
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": args.lr}), elbo)
    start = time.perf_counter()
    for _ in range(args.steps):
        svi.step()
    seconds = time.perf_counter() - start
    result = psis_diagnostic(
        target.model, guide, num_samples=args.eval_samples, max_plate_nesting=0
    )
    return {
        "gap": target.log_normalizer - result.elbo,
        "khat": result.khat,
        "ess": result.ess / result.num_samples,
        "ms_per_step": 1e3 * seconds / args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--init-scale", type=float, default=0.1)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="banana,funnel")
    parser.add_argument("--quick", action="store_true", help="tiny budget, a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_samples = 20, 200
    torch.set_num_threads(1)
    targets = {"banana": banana, "funnel": funnel}
    missing = [family for family in FLOW_FAMILIES if not hasattr(flows, family)]
    print(
        f"steps={args.steps} lr={args.lr} particles={args.particles} "
        f"init_scale={args.init_scale} flow layers={args.num_layers}x{args.hidden} "
        f"eval samples={args.eval_samples}"
    )
    if missing:
        print(f"flow families not in pyro_nf.flows yet: {', '.join(missing)}")
    header = (
        f"{'target':<8} {'guide':<24} {'log Z - ELBO':>13} {'k-hat':>7} {'ESS/S':>7} {'ms/step':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in args.targets.split(","):
        target = targets[name]()
        for guide_name, make_guide in guide_factories(args).items():
            row = evaluate(target, make_guide, args)
            print(
                f"{name:<8} {guide_name:<24} {row['gap']:>13.3f} {row['khat']:>7.2f} "
                f"{row['ess']:>7.3f} {row['ms_per_step']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
