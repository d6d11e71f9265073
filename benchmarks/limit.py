"""pyro-nf's flows against the bare conditioner networks (the limit) and their peers.

For each family and size, one run times side by side, alternating round by round:

- **limit**: the conditioner networks alone, as plain ``nn.Linear`` layers with their
  ReLUs (no masks, no flow, no coupling function, no base density): what one pass of
  the flow cannot do without. For a training step, the same networks' forward and
  backward. For MAF sampling, the matmuls of the incremental evaluation that
  pyro-nf's sequential pass does (at position ``i``: the hidden units of degree
  ``< i`` and the two outputs of that position, plus one rank-one update of the
  first layer), not D full passes;
- **pyro-nf** at the same architecture;
- the peers a user could pick instead, at the same architecture: **Pyro** (affine
  coupling stack with reverse permutations between layers; ``AffineAutoregressive``
  on ``AutoRegressiveNN``, through ``.inv`` for MAF) and **zuko** (``RealNVP``,
  ``MAF``, and for IAF ``MaskedAutoregressiveTransform`` behind ``LazyInverse``, so that
  sampling is its one-pass direction).

Architectures: real NVP 8 coupling layers, MAF/IAF 5 layers, every conditioner two
hidden layers of 256 (ReLU), affine coupling, float32, batch 4096, D = 16 and 64.
Every call gets a fresh input tensor (a clone), so no library answers from a cache.

The table gives the fastest call of each column (ms; load from other processes only
ever adds time), ``x limit`` (pyro-nf / limit), ``x best peer`` (pyro-nf / the faster
of Pyro and zuko) and, for both ratios, their range over the rounds: each round times
every column in turn, so the range shows how much the machine's load moved a ratio.

    python benchmarks/limit.py --threads 1 --rounds 10 --min-run-time 0.3   # the docs' table
    python benchmarks/limit.py --quick                       # a smoke test
    python benchmarks/limit.py --families maf --dims 16 --markdown
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
import zuko
from autoregressive import modules_of
from autoregressive import pyro_layers as pyro_autoregressive_layers
from coupling import pyro_realnvp as pyro_coupling_layers
from timing import common_arguments, parse_arguments, time_alternating
from torch import Tensor, nn

import pyro_nf

FAMILIES = ("realnvp", "maf", "iaf")
NUM_LAYERS = {"realnvp": 8, "maf": 5, "iaf": 5}


# ----------------------------------------------------------------------------- limit
def plain_network(sizes: list[int]) -> nn.Sequential:
    """``Linear, ReLU, ..., Linear`` through ``sizes``: a conditioner without its masks."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConditionerLimit(nn.Module):
    """The conditioner networks of a flow, each applied once to an input of its size."""

    def __init__(self, num_layers: int, sizes: list[int]) -> None:
        super().__init__()
        self.networks = nn.ModuleList(plain_network(sizes) for _ in range(num_layers))
        self.in_features = sizes[0]

    def forward(self, inputs: Tensor) -> Tensor:
        total = inputs.new_zeros(())
        for network in self.networks:
            total = total + network(inputs).sum()
        return total


def incremental_limit(made: pyro_nf.nn.MADE, num_layers: int, batch: int) -> Callable[[], Tensor]:
    """The matmuls of ``num_layers`` incremental MADE evaluations (MAF sampling).

    Unmasked weights of the MADE's shapes; at position ``i`` the hidden prefix that
    position needs, its own outputs and a rank-one update of the first layer: the
    arithmetic of :class:`pyro_nf.nn.made.AutoregressiveSteps`, nothing else.
    """
    dim = made.dim
    weights = [layer.weight.detach().clone() for layer in made.layers]
    biases = [layer.bias.detach().clone() for layer in made.layers]
    width = made.output.weight.shape[-1]
    output_weight = made.output.weight.detach().view(dim, -1, width).clone()
    output_bias = made.output.bias.detach().view(dim, -1).clone()
    input_rows = weights[0][:, :dim].t().contiguous()
    prefixes = made._prefix_sizes

    @torch.no_grad()
    def run() -> Tensor:
        out = None
        for _ in range(num_layers):
            pre = biases[0].expand(batch, -1).clone()
            value = torch.empty(batch, dim)
            for i in range(dim):
                h = F.relu(pre[:, : prefixes[0][i]])
                for k in range(1, len(weights)):
                    size, previous = prefixes[k][i], prefixes[k - 1][i]
                    h = F.relu(F.linear(h, weights[k][:size, :previous], biases[k][:size]))
                out = F.linear(h, output_weight[i][:, : prefixes[-1][i]], output_bias[i])
                value[:, i] = out[:, 0]
                if i < dim - 1:
                    pre.addmm_(value[:, i : i + 1], input_rows[i : i + 1])
        return out

    return run


# ----------------------------------------------------------------------------- peers
def zuko_iaf(dim: int, num_layers: int, hidden: list[int]) -> zuko.flows.Flow:
    """zuko's MAF layers inverted: sampling (z -> x) is their one-pass direction."""
    orders = [torch.arange(dim), torch.arange(dim - 1, -1, -1)]
    transforms = [
        zuko.flows.LazyInverse(
            zuko.flows.MaskedAutoregressiveTransform(
                features=dim, order=orders[i % 2], hidden_features=hidden
            )
        )
        for i in range(num_layers)
    ]
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True
    )
    return zuko.flows.Flow(transforms, base)


# ----------------------------------------------------------------------------- rows
def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def train_step(module: nn.Module, loss: Callable[[], Tensor]) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        loss().backward()

    return step


def rows_for(family: str, dim: int, batch: int, hidden: list[int]) -> dict[str, dict]:
    """``{row label: {column: callable}}`` for one family at one size."""
    torch.manual_seed(0)
    num_layers = NUM_LAYERS[family]
    x = torch.randn(batch, dim)
    tag = f"D={dim}"
    rows: dict[str, dict] = {}
    kwargs = {"num_layers": num_layers, "hidden_dims": hidden}

    if family == "realnvp":
        half = dim - (dim + 1) // 2
        limit = ConditionerLimit(num_layers, [(dim + 1) // 2, *hidden, 2 * half])
        u = torch.randn(batch, limit.in_features)
        ours = pyro_nf.realnvp(dim, **kwargs)
        pyro_layers = pyro_coupling_layers(dim, num_layers, hidden)
        pyro_modules = modules_of(pyro_layers)
        base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
        pyro_flow = dist.TransformedDistribution(base, pyro_layers)
        zuko_flow = zuko.flows.RealNVP(dim, transforms=num_layers, hidden_features=hidden)
        rows[f"realnvp log_prob {tag}"] = {
            "limit": no_grad(lambda: limit(u.clone())),
            "pyro-nf": no_grad(lambda: ours.log_prob(x.clone())),
            "pyro": no_grad(lambda: pyro_flow.log_prob(x.clone())),
            "zuko": no_grad(lambda: zuko_flow().log_prob(x.clone())),
        }
        rows[f"realnvp sample {tag}"] = {
            "limit": no_grad(lambda: limit(u.clone())),
            "pyro-nf": lambda: ours.sample((batch,)),
            "pyro": lambda: pyro_flow.sample((batch,)),
            "zuko": lambda: zuko_flow().sample((batch,)),
        }
        u_grad = u.clone().requires_grad_()
        rows[f"realnvp train step {tag}"] = {
            "limit": train_step(limit, lambda: limit(u_grad)),
            "pyro-nf": train_step(ours, lambda: -ours.log_prob(x.clone()).mean()),
            "pyro": train_step(pyro_modules, lambda: -pyro_flow.log_prob(x.clone()).mean()),
            "zuko": train_step(zuko_flow, lambda: -zuko_flow().log_prob(x.clone()).mean()),
        }
        return rows

    limit = ConditionerLimit(num_layers, [dim, *hidden, 2 * dim])
    u = torch.randn(batch, dim)
    u_grad = u.clone().requires_grad_()
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    if family == "maf":
        ours = pyro_nf.maf(dim, **kwargs)
        pyro_layers = pyro_autoregressive_layers(dim, num_layers, hidden, "affine", maf=True)
        pyro_flow = dist.TransformedDistribution(base, pyro_layers)
        pyro_modules = modules_of(pyro_layers)
        zuko_flow = zuko.flows.MAF(dim, transforms=num_layers, hidden_features=hidden)
        incremental = incremental_limit(ours.layers[0].conditioner, num_layers, batch)
        rows[f"maf log_prob {tag}"] = {
            "limit": no_grad(lambda: limit(u.clone())),
            "pyro-nf": no_grad(lambda: ours.log_prob(x.clone())),
            "pyro": no_grad(lambda: pyro_flow.log_prob(x.clone())),
            "zuko": no_grad(lambda: zuko_flow().log_prob(x.clone())),
        }
        rows[f"maf sample {tag}"] = {
            "limit": incremental,
            "pyro-nf": lambda: ours.sample((batch,)),
            "pyro": lambda: pyro_flow.sample((batch,)),
            "zuko": lambda: zuko_flow().sample((batch,)),
        }
        rows[f"maf train step {tag}"] = {
            "limit": train_step(limit, lambda: limit(u_grad)),
            "pyro-nf": train_step(ours, lambda: -ours.log_prob(x.clone()).mean()),
            "pyro": train_step(pyro_modules, lambda: -pyro_flow.log_prob(x.clone()).mean()),
            "zuko": train_step(zuko_flow, lambda: -zuko_flow().log_prob(x.clone()).mean()),
        }
        return rows

    ours = pyro_nf.iaf(dim, **kwargs)
    pyro_layers = pyro_autoregressive_layers(dim, num_layers, hidden, "affine", maf=False)
    pyro_flow = dist.TransformedDistribution(base, pyro_layers)
    pyro_modules = modules_of(pyro_layers)
    zuko_flow = zuko_iaf(dim, num_layers, hidden)

    def ours_variational() -> Tensor:
        distribution = ours()
        return distribution.log_prob(distribution.rsample((batch,)))

    def pyro_variational() -> Tensor:
        return pyro_flow.log_prob(pyro_flow.rsample((batch,)))

    def zuko_variational() -> Tensor:
        return zuko_flow().rsample_and_log_prob((batch,))[1]

    rows[f"iaf rsample+log_prob {tag}"] = {
        "limit": no_grad(lambda: limit(u.clone())),
        "pyro-nf": no_grad(ours_variational),
        "pyro": no_grad(pyro_variational),
        "zuko": no_grad(zuko_variational),
    }
    rows[f"iaf train step {tag}"] = {
        "limit": train_step(limit, lambda: limit(u_grad)),
        "pyro-nf": train_step(ours, lambda: -ours_variational().mean()),
        "pyro": train_step(pyro_modules, lambda: -pyro_variational().mean()),
        "zuko": train_step(zuko_flow, lambda: -zuko_variational().mean()),
    }
    return rows


# ----------------------------------------------------------------------------- timing
def time_row(columns: dict[str, Callable], rounds: int, min_run_time: float) -> dict:
    """The fastest call per column and the ratios, with their range over the rounds."""
    times = time_alternating(columns, rounds, min_run_time)
    best = {name: min(seconds) for name, seconds in times.items()}
    peers = [name for name in columns if name not in ("limit", "pyro-nf")]

    def ratios(k: int | None) -> tuple[float, float]:
        at = best if k is None else {name: seconds[k] for name, seconds in times.items()}
        return at["pyro-nf"] / at["limit"], at["pyro-nf"] / min(at[p] for p in peers)

    round_ratios = [ratios(k) for k in range(rounds)]
    to_limit, to_peer = ratios(None)
    return {
        "ms": {name: 1e3 * seconds for name, seconds in best.items()},
        "x_limit": to_limit,
        "x_limit_range": [min(r[0] for r in round_ratios), max(r[0] for r in round_ratios)],
        "x_best_peer": to_peer,
        "x_best_peer_range": [min(r[1] for r in round_ratios), max(r[1] for r in round_ratios)],
        "best_peer": min(peers, key=lambda p: best[p]),
    }


def print_table(results: dict[str, dict], markdown: bool) -> None:
    columns = ["limit", "pyro-nf", "pyro", "zuko"]
    if markdown:
        print("| row | " + " | ".join(f"{c} (ms)" for c in columns) + " | × limit | × best peer |")
        print("|---" * (len(columns) + 3) + "|")
    for label, r in results.items():
        lo, hi = r["x_limit_range"]
        plo, phi = r["x_best_peer_range"]
        times = [f"{r['ms'][c]:.2f}" for c in columns]
        to_limit = f"{r['x_limit']:.2f} ({lo:.2f}–{hi:.2f})"
        to_peer = f"{r['x_best_peer']:.2f} ({plo:.2f}–{phi:.2f}, {r['best_peer']})"
        if markdown:
            print(f"| {label} | " + " | ".join(times) + f" | {to_limit} | {to_peer} |")
        else:
            print(f"{label:<28}" + "".join(f"{t:>10}" for t in times) + f"  {to_limit}  {to_peer}")


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--output", default=None, help="write the results to this JSON file")
    parser.add_argument("--rows", default=None, help="only rows whose label contains this")
    args = parse_arguments(parser)
    if args.device != "cpu":
        parser.error("the limit benchmark runs on the CPU (see gpu_throughput.py for CUDA)")
    hidden, batch, rounds = [256, 256], args.batch, max(args.rounds, 1)
    if args.quick:
        hidden, batch, args.dims, args.min_run_time = [16, 16], 64, [4], 0.01
    print(
        f"limit: hidden {hidden}, batch {batch}, float32, {torch.get_num_threads()} threads, "
        f"{rounds} rounds; columns: " + ", ".join(["limit", "pyro-nf", "pyro", "zuko"])
    )
    results: dict[str, dict] = {}
    for family in args.families:
        for dim in args.dims:
            for label, columns in rows_for(family, dim, batch, hidden).items():
                if args.rows and args.rows not in label:
                    continue
                results[label] = time_row(columns, rounds, args.min_run_time)
                print_table({label: results[label]}, markdown=False)
    if args.markdown:
        print()
        print_table(results, markdown=True)
    if args.output:
        with open(args.output, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
