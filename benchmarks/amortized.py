"""Amortized guides of local latents at one budget, on posteriors we can check.

Two tasks, each with 64 items under a plate and one latent site ``z`` per item:

* ``conjugate``: ``z_g ~ N(0, I_3)``, five observations ``x_gj ~ N(z_g, s_g^2 I_3)``
  per group with a known noise scale ``s_g`` (log-uniform on [0.2, 2], an argument of
  the model, so the posterior's width changes from item to item). The posterior is
  closed-form, :math:`N(\\mu_g, \\tau_g^2 I)` with :math:`\\tau_g^{-2} = 1 + 5/s_g^2`
  and :math:`\\mu_g = \\tau_g^2 \\sum_j x_{gj}/s_g^2`.
* ``tutorial``: the model and data of Pyro's tutorial "SVI with a normalizing flow
  guide" (``tutorial/source/svi_flow_guide.ipynb``): ``z ~ N(0, I_3)``, five draws of
  a 2-D Gaussian with mean ``z[:2]``, covariance ``1e-2 [[1, r], [r, 1]]`` and
  ``r = 0.99 tanh(z[2])``; 64 items generated here with a seed (the tutorial draws
  them unseeded). No closed form: the true latents ``z*`` that made the data are the
  check.

Guides, all trained with the tutorial's recipe (ClippedAdam, lr 1e-3, clip_norm 10,
16 vectorized particles of ``Trace_ELBO``) for the same number of steps from the same
seed:

* ``AmortizedFlowGuide(<family>)`` for the conditional families of
  :data:`pyro_nf.flows.FLOW_BUILDERS` at the builder's defaults, given a shared encoder
  design (an MLP from the item's data to a 16-d context);
* ``AmortizedFlowGuide.from_site(<family>)``: the convenience constructor (default
  encoder, the item's raw data and the encoder's output as the context, flow sized
  from the site, an amortized affine layer after the flow); ``--variant LABEL=JSON``
  adds ``AmortizedFlowGuide.from_site(<family>, LABEL)`` with other ``from_site``
  options, e.g. ``'before={"raw_features": false}'`` (the default before);
* ``amortized Normal``: the same encoder with a diagonal Normal head (loc and
  softplus scale); ``amortized Normal (raw features)``: its head reads the item's raw
  data besides the encoder's output;
* ``zuko NSF (tutorial)``: the tutorial's guide, ``zuko.flows.NSF(features=3,
  context=F, transforms=1, hidden_features=(256, 256))`` inverted, behind
  ``pyro.contrib.zuko.ZukoToPyro``, with the raw item data as context.

Reported per guide: the ELBO (``--eval-particles`` vectorized particles), the mean
over items of ``log q(z*)`` (exact posterior draws on ``conjugate``, the true latents
on ``tutorial``), on ``conjugate`` also KL(q || p) and KL(p || q) per item, mean
``|E_q - E_p| / sd_p`` and mean ``log(sd_q / sd_p)`` over items and coordinates, and
the training time; the JSON output also holds the mean loss of every 256 steps.

    python benchmarks/amortized.py            # full run (about 15 minutes on 2 cores)
    python benchmarks/amortized.py --quick    # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn

from pyro_nf.flows import flow_builder
from pyro_nf.infer.amortized import AmortizedFlowGuide, FeatureEncoder

LATENT_DIM = 3
NUM_OBSERVATIONS = 5
CONTEXT_DIM = 16
ENCODER_HIDDEN = (64, 64)


# ----------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """A model, its data (the model's arguments), the true latents and, if known, the posterior."""

    name: str
    model: Callable[..., None]
    args: tuple[Tensor, ...]
    features: Callable[..., Tensor]  # model args -> (items, F): each item's raw data
    z_star: Tensor  # (items, D): the latents that generated the data
    posterior: tuple[Tensor, Tensor] | None = None  # exact (loc, scale), (items, D) each

    @property
    def feature_dim(self) -> int:
        return self.features(*self.args).shape[-1]


def conjugate_model(x: Tensor, noise: Tensor) -> None:
    """``z_g ~ N(0, I)``, ``x_gj ~ N(z_g, noise_g^2 I)``; x: (G, n, D), noise: (G,)."""
    with pyro.plate("groups", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT_DIM), 1.0).to_event(1))
        with pyro.plate("observations", x.shape[1]):
            likelihood = dist.Normal(z, noise[:, None]).to_event(1)
            pyro.sample("x", likelihood, obs=x.transpose(0, 1))


def conjugate_features(x: Tensor, noise: Tensor) -> Tensor:
    return torch.cat([x.flatten(-2), noise.log()[:, None]], dim=-1)


def conjugate_task(groups: int, seed: int) -> Task:
    generator = torch.Generator().manual_seed(seed)
    noise = (math.log(0.2) + math.log(10.0) * torch.rand(groups, generator=generator)).exp()
    z = torch.randn(groups, LATENT_DIM, generator=generator)
    eps = torch.randn(groups, NUM_OBSERVATIONS, LATENT_DIM, generator=generator)
    x = z[:, None] + noise[:, None, None] * eps
    precision = 1 + NUM_OBSERVATIONS / noise**2
    loc = (x.sum(1) / noise[:, None] ** 2) / precision[:, None]
    scale = precision.rsqrt()[:, None].expand(groups, LATENT_DIM)
    return Task("conjugate", conjugate_model, (x, noise), conjugate_features, z, (loc, scale))


def tutorial_likelihood(z: Tensor) -> dist.Distribution:
    """The tutorial's p(x | z): a 2-D Gaussian with mean z[:2] and correlation from z[2]."""
    mu = z[..., :2]
    rho = z[..., 2].tanh() * 0.99
    ones = torch.ones_like(rho)
    cov = 1e-2 * torch.stack([ones, rho, rho, ones], dim=-1).unflatten(-1, (2, 2))
    return dist.MultivariateNormal(mu, cov)


def tutorial_model(x: Tensor) -> None:
    """The tutorial's model; x: (items, 5, 2)."""
    prior = dist.Normal(x.new_zeros(LATENT_DIM), 1.0).to_event(1)
    with pyro.plate("batch", len(x)):
        z = pyro.sample("z", prior)
        with pyro.plate("obs", NUM_OBSERVATIONS):
            pyro.sample("x", tutorial_likelihood(z), obs=x.transpose(0, 1))


def tutorial_features(x: Tensor) -> Tensor:
    return x.flatten(-2)


def tutorial_task(items: int, seed: int) -> Task:
    generator = torch.Generator().manual_seed(seed)
    z_star = torch.randn(items, LATENT_DIM, generator=generator)
    likelihood = tutorial_likelihood(z_star)
    # MultivariateNormal.sample takes no generator: draw eps and apply the Cholesky factor.
    eps = torch.randn(NUM_OBSERVATIONS, items, 2, generator=generator)
    x_star = likelihood.loc + (likelihood.scale_tril @ eps[..., None]).squeeze(-1)
    return Task("tutorial", tutorial_model, (x_star.transpose(0, 1),), tutorial_features, z_star)


TASKS: dict[str, Callable[[int, int], Task]] = {
    "conjugate": conjugate_task,
    "tutorial": tutorial_task,
}


# ----------------------------------------------------------------------------- guides


def shared_encoder(task: Task, raw_features: bool = False) -> FeatureEncoder:
    """The shared encoder design: ``MLP(features(*args))``, one context per item (with
    ``raw_features``, ``[features(*args), MLP(features(*args))]``)."""
    return FeatureEncoder(
        task.features, task.feature_dim, CONTEXT_DIM, ENCODER_HIDDEN, raw_features=raw_features
    )


@dataclass
class Guide:
    """A guide for SVI and its per-item posterior (batch shape: the items)."""

    guide: Callable[..., object]
    posterior: Callable[..., dist.Distribution]
    parameters: Callable[[], list[Tensor]]


def amortized_flow_guide(task: Task, family: str) -> Guide:
    encoder = shared_encoder(task)
    flow = flow_builder(family)(LATENT_DIM, context_dim=CONTEXT_DIM)
    guide = AmortizedFlowGuide(task.model, encoder, flow, site="z")
    return Guide(guide, guide.get_posterior, lambda: list(guide.parameters()))


def amortized_flow_guide_from_site(task: Task, family: str, **options: object) -> Guide:
    guide = AmortizedFlowGuide.from_site(
        task.model, task.features, site="z", flow=family, **options
    )
    return Guide(guide, guide.get_posterior, lambda: list(guide.parameters()))


class NormalHead(nn.Module):
    """The shared encoder followed by a diagonal Normal: loc and softplus scale per item.

    With ``raw_features`` the linear head reads ``[features, encoder]``, as the flows of
    ``AmortizedFlowGuide.from_site`` do by default.
    """

    def __init__(self, task: Task, raw_features: bool = False) -> None:
        super().__init__()
        self.encoder = shared_encoder(task, raw_features)
        self.head = nn.Linear(self.encoder.out_features, 2 * LATENT_DIM)

    def forward(self, *args: Tensor) -> dist.Distribution:
        loc, raw_scale = self.head(self.encoder(*args)).chunk(2, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(raw_scale)).to_event(1)


def amortized_normal_guide(task: Task, plate: str, raw_features: bool = False) -> Guide:
    module = NormalHead(task, raw_features)

    def guide(*args: Tensor) -> None:
        pyro.module("normal_head", module)
        with pyro.plate(plate, args[0].shape[0]):
            pyro.sample("z", module(*args))

    return Guide(guide, module, lambda: list(module.parameters()))


def zuko_nsf_guide(task: Task, plate: str) -> Guide:
    import zuko
    from pyro.contrib.zuko import ZukoToPyro

    flow = zuko.flows.NSF(
        features=LATENT_DIM, context=task.feature_dim, transforms=1, hidden_features=(256, 256)
    )
    flow.transform = flow.transform.inv  # the tutorial's IAF: one pass to sample

    def guide(*args: Tensor) -> None:
        pyro.module("flow", flow)
        with pyro.plate(plate, args[0].shape[0]):
            pyro.sample("z", ZukoToPyro(flow(task.features(*args))))

    return Guide(guide, lambda *args: flow(task.features(*args)), lambda: list(flow.parameters()))


PLATES = {"conjugate": "groups", "tutorial": "batch"}


def guide_factories(
    families: tuple[str, ...], variants: dict[str, dict] | None = None
) -> dict[str, Callable[[Task], Guide]]:
    """The guides by name; ``variants`` (label -> ``from_site`` options) adds one
    ``AmortizedFlowGuide.from_site(<family>, <label>)`` per family and label."""
    factories: dict[str, Callable[[Task], Guide]] = {}
    for family in families:
        factories[f"AmortizedFlowGuide({family})"] = lambda task, family=family: (
            amortized_flow_guide(task, family)
        )
    for family in families:
        factories[f"AmortizedFlowGuide.from_site({family})"] = lambda task, family=family: (
            amortized_flow_guide_from_site(task, family)
        )
    for label, options in (variants or {}).items():
        for family in families:
            factories[f"AmortizedFlowGuide.from_site({family}, {label})"] = (
                lambda task, family=family, options=options: amortized_flow_guide_from_site(
                    task, family, **options
                )
            )
    factories["amortized Normal"] = lambda task: amortized_normal_guide(task, PLATES[task.name])
    factories["amortized Normal (raw features)"] = lambda task: amortized_normal_guide(
        task, PLATES[task.name], raw_features=True
    )
    factories["zuko NSF (tutorial)"] = lambda task: zuko_nsf_guide(task, PLATES[task.name])
    return factories


# ------------------------------------------------------------------------ train, score


@dataclass
class Budget:
    steps: int = 4096
    particles: int = 16
    lr: float = 1e-3
    lr_decay: float = 1.0  # the learning rate's factor over the whole run (1: constant)
    clip_norm: float = 10.0
    eval_particles: int = 1000
    items: int = 64
    seed: int = 0


LOSS_WINDOW = 256  # the tutorial prints its loss every 256 steps


def train(task: Task, guide: Guide, budget: Budget) -> tuple[float, list[float]]:
    """Train; returns the seconds and the mean loss of every ``LOSS_WINDOW`` steps."""
    options = {"lr": budget.lr, "clip_norm": budget.clip_norm}
    options["lrd"] = budget.lr_decay ** (1 / budget.steps)
    optimizer = pyro.optim.ClippedAdam(options)
    elbo = Trace_ELBO(num_particles=budget.particles, vectorize_particles=True)
    svi = SVI(task.model, guide.guide, optimizer, elbo)
    losses = []
    start = time.perf_counter()
    for step in range(budget.steps):
        loss = svi.step(*task.args)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss} at step {step}")
        losses.append(loss)
    seconds = time.perf_counter() - start
    windows = range(0, len(losses), LOSS_WINDOW)
    return seconds, [
        sum(losses[i : i + LOSS_WINDOW]) / len(losses[i : i + LOSS_WINDOW]) for i in windows
    ]


@torch.no_grad()
def score(task: Task, guide: Guide, budget: Budget) -> dict[str, float]:
    elbo = Trace_ELBO(num_particles=budget.eval_particles, vectorize_particles=True)
    row = {"elbo": -elbo.loss(task.model, guide.guide, *task.args)}
    q = guide.posterior(*task.args)
    if task.posterior is None:
        row["log_q_true"] = float(q.log_prob(task.z_star).mean())
        return row
    loc, scale = task.posterior
    exact = dist.Normal(loc, scale).to_event(1)
    exact_draws = exact.sample((budget.eval_particles,))
    row["log_q_true"] = float(q.log_prob(exact_draws).mean())
    row["kl_pq"] = float((exact.log_prob(exact_draws) - q.log_prob(exact_draws)).mean())
    draws = q.sample((budget.eval_particles,))
    row["kl_qp"] = float((q.log_prob(draws) - exact.log_prob(draws)).mean())
    row["mean_error"] = float(((draws.mean(0) - loc).abs() / scale).mean())
    row["log_sd_ratio"] = float((draws.std(0) / scale).log().mean())
    return row


def run_cell(task: Task, name: str, make: Callable[[Task], Guide], budget: Budget) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(budget.seed)
    guide = make(task)
    seconds, loss_trace = train(task, guide, budget)
    parameters = sum(p.numel() for p in guide.parameters())
    row = {"task": task.name, "guide": name, "parameters": parameters}
    row.update(score(task, guide, budget))
    row.update(seconds=seconds, ms_per_step=1e3 * seconds / budget.steps)
    row["loss_trace"] = loss_trace
    return row


COLUMNS = [
    ("elbo", "ELBO", "{:.2f}"),
    ("log_q_true", "mean log q(z*)", "{:.3f}"),
    ("kl_qp", "KL(q‖p)", "{:.4f}"),
    ("kl_pq", "KL(p‖q)", "{:.4f}"),
    ("mean_error", "mean \\|err\\|/sd", "{:.3f}"),
    ("log_sd_ratio", "mean log sd ratio", "{:+.3f}"),
    ("parameters", "parameters", "{:,}"),
    ("ms_per_step", "ms/step", "{:.1f}"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        columns = [c for c in COLUMNS if any(c[0] in row for row in task_rows)]
        lines.append(f"\n**{task}**\n")
        lines.append("| guide | " + " | ".join(title for _, title, _ in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for row in task_rows:
            cells = [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
            lines.append(f"| {row['guide']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny budget")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--families", nargs="+", default=["iaf", "realnvp", "maf"])
    parser.add_argument("--guides", nargs="+", default=None, help="guide names (default all)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr-decay", type=float, default=1.0, help="the learning rate's factor over the run"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=JSON",
        help="also run AmortizedFlowGuide.from_site(<family>, LABEL) with the JSON object's "
        "options (e.g. 'wide={\"hidden_dims\": [128, 128]}'); repeatable",
    )
    parser.add_argument("--output", type=Path, default=None, help="rows as JSON")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = Budget(seed=args.seed)
    if args.quick:
        budget = Budget(steps=3, particles=2, eval_particles=8, items=8, seed=args.seed)
    if args.steps is not None:
        budget.steps = args.steps
    budget.lr_decay = args.lr_decay
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected some of {list(TASKS)}")
    variants = {}
    for entry in args.variant:
        label, _, options = entry.partition("=")
        variants[label] = json.loads(options) if options else {}
    factories = guide_factories(tuple(args.families), variants)
    names = list(factories) if args.guides is None else list(args.guides)
    if args.guides is not None:
        names += [
            f"AmortizedFlowGuide.from_site({f}, {v})" for v in variants for f in args.families
        ]
    unknown = sorted(set(names) - set(factories))
    if unknown:
        raise ValueError(f"unknown guides {unknown}; expected some of {list(factories)}")
    print(f"budget: {asdict(budget)}", flush=True)
    rows = []
    for task_name in args.tasks:
        task = TASKS[task_name](budget.items, budget.seed)
        for name in names:
            row = run_cell(task, name, factories[name], budget)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.output is not None:
                args.output.write_text(json.dumps({"budget": asdict(budget), "rows": rows}))
    table = markdown_table(rows)
    print(table)
    return {"budget": asdict(budget), "rows": rows, "table": table}


if __name__ == "__main__":
    main()
