"""ELBO gap (log Z - ELBO = KL(q || p)) and PSIS k-hat of autoguides on known targets.

Every guide is trained with the same optimizer, learning rate, number of steps and
particles, from the same seed, on the 2-D banana (``targets.twisted_gaussian``) and
Neal's funnel (d = 10), whose normalizers are known (``pyro_nf.infer.targets``).
The gap is estimated with
``--eval-samples`` vectorized guide draws, k-hat with as many (``psis_diagnostic``).
The flow families are those of the registry ``pyro_nf.flows.FLOW_BUILDERS``.

    python benchmarks/guides.py            # full run (a few minutes on 2 cores)
    python benchmarks/guides.py --quick    # smoke test
    python benchmarks/guides.py --neutra --targets funnel   # also NUTS vs NeuTra NUTS
    python benchmarks/guides.py --soak     # 10,000 steps per family and task (slow)

``--soak`` trains every family at its *default* settings (``AutoFlow(model,
flow=family)``, and ``flow_builder(family)(dim=2)`` for the density task) for
``--soak-steps`` steps on the banana, the funnel and a density task (two moons,
minibatches of 256), and reports the first non-finite loss (none expected) and any
parameter or buffer that an evaluation changed (none expected: a read never writes).
``tests/test_soak.py`` runs the same :func:`soak` (slow-marked).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size

from pyro_nf import datasets
from pyro_nf.flows import FLOW_BUILDERS, flow_builder
from pyro_nf.infer import AutoFlow, psis_diagnostic
from pyro_nf.infer.targets import Target, funnel, twisted_gaussian


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


# ------------------------------------------------------------------------------ soak

SOAK_TASKS = ("banana", "funnel", "density")


@dataclass
class SoakResult:
    """What a soak run saw: losses, the first non-finite one, and evaluation drift."""

    family: str
    task: str
    steps: int
    seconds: float = 0.0
    first_non_finite: int | None = None
    drift: list[str] = field(default_factory=list)
    final_loss: float = math.nan

    @property
    def ok(self) -> bool:
        return self.first_non_finite is None and not self.drift


def _snapshot(modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``modules`` and of Pyro's param store, cloned."""
    state = {f"store:{k}": v.detach().clone() for k, v in pyro.get_param_store().items()}
    for index, module in enumerate(modules):
        for name, tensor in module.state_dict(keep_vars=True).items():
            state[f"{index}:{name}"] = tensor.detach().clone()
    return state


def _changed(before: dict[str, torch.Tensor], modules: list[torch.nn.Module]) -> list[str]:
    after = _snapshot(modules)
    return [k for k in before if k not in after or not torch.equal(before[k], after[k])]


def _guide_task(task: str, family: str, lr: float):
    target = {"banana": twisted_gaussian, "funnel": funnel}[task]()
    guide = AutoFlow(target.model, flow=family)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())

    def evaluate() -> None:
        # The reads of a trained guide that once rewrote it: a single-draw ELBO under
        # no_grad (evaluate_loss), Predictive, and a batch of draws.
        svi.evaluate_loss()
        Predictive(target.model, guide=guide, num_samples=1)()
        with torch.no_grad():
            guide.get_posterior().sample((4,))

    return svi.step, evaluate, [guide]


def _density_task(family: str, lr: float, batch_size: int = 256):
    flow = flow_builder(family)(dim=2)
    data = datasets.two_moons(10_000, seed=1)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(2)

    def step() -> float:
        batch = data[torch.randint(len(data), (batch_size,), generator=generator)]
        loss = -flow().log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def evaluate() -> None:
        with torch.no_grad():
            flow().sample()
            flow().log_prob(data[:1])
            flow().log_prob(flow().sample((3,)))
        flow.eval()
        with torch.no_grad():
            flow().log_prob(data[:5])
        flow.train()

    return step, evaluate, [flow]


def soak(
    family: str,
    task: str,
    steps: int = 10_000,
    check_every: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SoakResult:
    """Train ``family`` at its default settings on ``task`` for ``steps`` steps.

    Every ``check_every`` steps (and after the last) the model is evaluated the ways
    users read it (see ``_guide_task`` / ``_density_task``), and every parameter and
    buffer is compared bit for bit with its value before that evaluation. Training
    stops at the first non-finite loss. SVI uses Adam(lr=0.005) and one particle
    (Pyro's default); the density task Adam(lr=1e-3) on minibatches of 256.
    """
    if task not in SOAK_TASKS:
        raise ValueError(f"unknown soak task {task!r}; expected one of {SOAK_TASKS}")
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if task == "density":
        step, evaluate, modules = _density_task(family, lr=1e-3)
    else:
        step, evaluate, modules = _guide_task(task, family, lr=0.005)
    result = SoakResult(family, task, steps)
    recent: list[float] = []
    start = time.perf_counter()
    for index in range(1, steps + 1):
        loss = step()
        if not math.isfinite(loss):
            result.first_non_finite = index
            break
        recent = (recent + [loss])[-100:]
        if index % check_every == 0 or index == steps:
            before = _snapshot(modules)
            evaluate()
            result.drift += [f"step {index}: {name}" for name in _changed(before, modules)]
            if progress is not None:
                mean = sum(recent) / len(recent)
                progress(f"{family}/{task} step {index}: mean loss of the last 100 {mean:.4f}")
    result.seconds = time.perf_counter() - start
    result.final_loss = sum(recent) / len(recent) if recent else math.nan
    return result


def run_soak(args) -> bool:
    families = args.families.split(",") if args.families else list(FLOW_BUILDERS)
    tasks = args.soak_tasks.split(",")
    print(f"soak: {args.soak_steps} steps per family and task, default settings")
    header = f"{'family':<8} {'task':<8} {'final loss':>11} {'non-finite at':>14} {'drift':>6} {'minutes':>8}"
    print(header)
    print("-" * len(header))
    ok = True

    def log(line: str) -> None:
        print(f"    {line}", flush=True)

    for family in families:
        for task in tasks:
            result = soak(family, task, steps=args.soak_steps, seed=args.seed, progress=log)
            ok = ok and result.ok
            print(
                f"{family:<8} {task:<8} {result.final_loss:>11.4f} "
                f"{str(result.first_non_finite or '-'):>14} {len(result.drift):>6} "
                f"{result.seconds / 60:>8.1f}",
                flush=True,
            )
            for line in result.drift[:5]:
                print(f"    drift: {line}")
    return ok


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--soak", action="store_true", help="the long-run stability check")
    parser.add_argument("--soak-steps", type=int, default=10_000)
    parser.add_argument("--soak-tasks", default=",".join(SOAK_TASKS))
    parser.add_argument("--families", default=None, help="comma-separated; default: all")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_samples, args.mcmc_samples = 20, 200, 10
        args.soak_steps = 20
    torch.set_num_threads(1)
    if args.soak:
        if not run_soak(args):
            raise SystemExit("soak: a non-finite loss or a parameter changed by a read")
        return
    targets = {"banana": twisted_gaussian, "funnel": funnel}
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
