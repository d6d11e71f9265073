"""ELBO gap (log Z - ELBO = KL(q || p)) and PSIS k-hat of autoguides on known targets.

Every guide is trained with the same optimizer, learning rate, number of steps and
particles, from the same seed, on the 2-D banana and Neal's funnel (d = 10), whose
normalizers are known (``pyro_nf.infer.targets``). The gap is estimated with
``--eval-samples`` vectorized guide draws, k-hat with as many (``psis_diagnostic``).
The flow families are those of the registry ``pyro_nf.flows.FLOW_BUILDERS``.

    python benchmarks/guides.py            # full run (a few minutes on 2 cores)
    python benchmarks/guides.py --quick    # smoke test
    python benchmarks/guides.py --neutra --targets funnel   # also NUTS vs NeuTra NUTS
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size

from pyro_nf.flows import FLOW_BUILDERS
from pyro_nf.infer import AutoFlow, psis_diagnostic
from pyro_nf.infer.targets import Target, banana, funnel


def flow_kwargs(family: str, args) -> dict:
    """The builder's arguments: the same network width for every family."""
    hidden_dims = (args.hidden,) * 2
    if family == "cnf":
        # One ODE block; backpropagation through dopri5 is faster than the adjoint here.
        return {"hidden_dims": hidden_dims, "rtol": 1e-3, "atol": 1e-3, "adjoint": False}
    return {"num_layers": args.num_layers, "hidden_dims": hidden_dims}


def guide_factories(args):
    factories = {
        "AutoNormal": lambda model: AutoNormal(model, init_scale=args.init_scale),
        "AutoMultivariateNormal": lambda model: AutoMultivariateNormal(
            model, init_scale=args.init_scale
        ),
    }
    for family in FLOW_BUILDERS:
        factories[f"AutoFlow({family})"] = lambda model, family=family: AutoFlow(
            model, flow=family, init_scale=args.init_scale, **flow_kwargs(family, args)
        )
    return factories


def train(target: Target, make_guide, args):
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide = make_guide(target.model)
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=0)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": args.lr}), elbo)
    start = time.perf_counter()
    for _ in range(args.steps):
        svi.step()
    return guide, time.perf_counter() - start


def evaluate(target: Target, make_guide, args) -> dict:
    guide, seconds = train(target, make_guide, args)
    result = psis_diagnostic(
        target.model, guide, num_samples=args.eval_samples, max_plate_nesting=0
    )
    return {
        "gap": target.log_normalizer - result.elbo,
        "khat": result.khat,
        "ess": result.ess / result.num_samples,
        "ms_per_step": 1e3 * seconds / args.steps,
    }


def nuts_ess(model, args, transform=None) -> tuple[float, float, float]:
    """Bulk ESS of the first coordinate and the smallest over coordinates, and seconds."""
    pyro.set_rng_seed(args.seed)
    mcmc = MCMC(NUTS(model), num_samples=args.mcmc_samples, warmup_steps=args.mcmc_samples)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    samples = mcmc.get_samples()
    x = samples["x"] if transform is None else transform(samples["x_shared_latent"])["x"]
    ess = effective_sample_size(x.detach()[None], chain_dim=0, sample_dim=1)
    return float(ess[0]), float(ess.min()), seconds


def neutra(target: Target, args) -> None:
    """NUTS on the target against NUTS on the NeuTra-reparametrized target."""
    family = args.neutra_flow
    make_guide = guide_factories(args)[f"AutoFlow({family})"]
    guide, _ = train(target, make_guide, args)
    guide.requires_grad_(False)
    reparam = NeuTraReparam(guide)
    print(f"\nNUTS on {target.name}, {args.mcmc_samples} warmup + {args.mcmc_samples} draws")
    print(f"{'sampler':<26} {'ESS(x[0])':>10} {'min ESS':>8} {'seconds':>8}")
    rows = {
        "NUTS": nuts_ess(target.model, args),
        f"NeuTra({family}) + NUTS": nuts_ess(
            reparam.reparam(target.model), args, reparam.transform_sample
        ),
    }
    for name, (first, smallest, seconds) in rows.items():
        print(f"{name:<26} {first:>10.1f} {smallest:>8.1f} {seconds:>8.1f}", flush=True)


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
    parser.add_argument("--neutra", action="store_true", help="also compare NUTS and NeuTra")
    parser.add_argument("--neutra-flow", default="realnvp", help="the NeuTra guide's flow")
    parser.add_argument("--mcmc-samples", type=int, default=500, help="warmup and draws")
    parser.add_argument("--quick", action="store_true", help="tiny budget, a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_samples, args.mcmc_samples = 20, 200, 10
    torch.set_num_threads(1)
    targets = {"banana": banana, "funnel": funnel}
    print(
        f"steps={args.steps} lr={args.lr} particles={args.particles} "
        f"init_scale={args.init_scale} flow layers={args.num_layers}x{args.hidden} "
        f"eval samples={args.eval_samples}"
    )
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
        if args.neutra:
            neutra(target, args)


if __name__ == "__main__":
    main()
