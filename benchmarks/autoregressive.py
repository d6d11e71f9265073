"""MAF and IAF (pyro_nf.maf / pyro_nf.iaf) against Pyro's autoregressive transforms.

Both sides have 5 autoregressive layers with a reverse permutation between them, MADE
conditioners with hidden sizes [256, 256] (ReLU) and the natural order inside each
layer, and use float32. Pyro's side is ``AffineAutoregressive`` (or
``SplineAutoregressive`` with ``order="quadratic"``, 8 bins) on ``AutoRegressiveNN``:
used directly it is an IAF (cheap z -> x); through ``.inv`` it is a MAF (cheap x -> z).

Rows, per D and coupling function:

- ``maf log_prob``: density of data points (one pass per layer).
- ``maf sample``: draws (D sequential passes per layer).
- ``maf train step``: ``-log_prob(x).mean()`` and backward on data.
- ``iaf rsample+log_prob``: the variational pattern on the same draws (one pass per
  layer; the density comes from the caches).
- ``iaf log_prob foreign``: density of points the flow did not draw (sequential).
- ``iaf train step``: the variational pattern, ``-log_prob(rsample()).mean()``, and
  backward.

Every log_prob of data gets a fresh tensor (a clone): Pyro's identity-keyed cache would
otherwise skip the computation for a repeated input. After the table, the cost of the
sequential direction is given in units of one density pass (MAF) or one sampling pass
(IAF) of the same flow: D would be "one full conditioner pass per position".

    python benchmarks/autoregressive.py              # D = 16 and 64, batch 4096
    python benchmarks/autoregressive.py --quick      # tiny sizes, a smoke test
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN
from timing import Row, common_arguments, parse_arguments, run_rows, synchronized

import pyro_nf

NUM_BINS = 8
BOUND = 3.0


def pyro_layers(dim: int, num_layers: int, hidden: list[int], coupling: str, maf: bool) -> list:
    """Pyro's stack of the same architecture, z -> x, with its modules."""
    layers = []
    for i in range(num_layers):
        order = torch.arange(dim)
        if coupling == "affine":
            network = AutoRegressiveNN(dim, hidden, param_dims=[1, 1], permutation=order)
            layer = T.AffineAutoregressive(network)
        else:
            network = AutoRegressiveNN(
                dim, hidden, param_dims=[NUM_BINS, NUM_BINS, NUM_BINS - 1], permutation=order
            )
            layer = T.SplineAutoregressive(
                dim, network, count_bins=NUM_BINS, bound=BOUND, order="quadratic"
            )
        layers.append(layer.inv if maf else layer)
        if i < num_layers - 1:
            layers.append(T.Permute(torch.arange(dim - 1, -1, -1)))
    return layers


def modules_of(layers: list) -> torch.nn.ModuleList:
    modules = []
    for layer in layers:
        layer = getattr(layer, "_inv", None) or layer
        if isinstance(layer, torch.nn.Module):
            modules.append(layer)
    return torch.nn.ModuleList(modules)


def rows_for(
    dim: int, coupling: str, batch: int, num_layers: int, hidden: list[int], device: torch.device
) -> list[Row]:
    torch.manual_seed(0)
    kwargs = {"num_layers": num_layers, "hidden_dims": hidden, "coupling_function": coupling}
    if coupling == "spline":
        # Pyro's spline has identity tails: the same function, for a like-for-like time.
        kwargs["coupling_kwargs"] = {"num_bins": NUM_BINS, "bound": BOUND, "tails": "identity"}
    ours_maf = pyro_nf.maf(dim, **kwargs).to(device)
    ours_iaf = pyro_nf.iaf(dim, **kwargs).to(device)
    pyro_maf_layers = pyro_layers(dim, num_layers, hidden, coupling, maf=True)
    pyro_iaf_layers = pyro_layers(dim, num_layers, hidden, coupling, maf=False)
    pyro_maf_modules = modules_of(pyro_maf_layers).to(device)
    pyro_iaf_modules = modules_of(pyro_iaf_layers).to(device)
    base = dist.Normal(torch.zeros(dim, device=device), torch.ones(dim, device=device)).to_event(1)
    pyro_maf = dist.TransformedDistribution(base, pyro_maf_layers)
    pyro_iaf = dist.TransformedDistribution(base, pyro_iaf_layers)
    x = torch.randn(batch, dim, device=device)

    def timed(fn):
        return synchronized(fn, device)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    def density_step(distribution, modules):
        def step():
            modules.zero_grad(set_to_none=True)
            (-distribution().log_prob(x.clone()).mean()).backward()

        return step

    def variational(distribution):
        def run():
            draws = distribution().rsample((batch,))
            return distribution().log_prob(draws)

        return run

    def variational_step(distribution, modules):
        def step():
            modules.zero_grad(set_to_none=True)
            (-variational(distribution)().mean()).backward()

        return step

    tag = f"{coupling} D={dim}"
    return [
        Row(
            f"maf log_prob {tag}",
            timed(no_grad(lambda: ours_maf().log_prob(x.clone()))),
            timed(no_grad(lambda: pyro_maf.log_prob(x.clone()))),
        ),
        Row(
            f"maf sample {tag}",
            timed(lambda: ours_maf().sample((batch,))),
            timed(lambda: pyro_maf.sample((batch,))),
        ),
        Row(
            f"maf train step {tag}",
            timed(density_step(ours_maf, ours_maf)),
            timed(density_step(lambda: pyro_maf, pyro_maf_modules)),
        ),
        Row(
            f"iaf rsample+log_prob {tag}",
            timed(no_grad(variational(ours_iaf))),
            timed(no_grad(variational(lambda: pyro_iaf))),
        ),
        Row(
            f"iaf log_prob foreign {tag}",
            timed(no_grad(lambda: ours_iaf().log_prob(x.clone()))),
            timed(no_grad(lambda: pyro_iaf.log_prob(x.clone()))),
        ),
        Row(
            f"iaf train step {tag}",
            timed(variational_step(ours_iaf, ours_iaf)),
            timed(variational_step(lambda: pyro_iaf, pyro_iaf_modules)),
        ),
    ]


def sequential_costs(results: list[dict]) -> None:
    """The sequential direction in units of the same flow's one-pass direction."""
    by_label = {r["label"]: r for r in results}
    print("\nsequential direction / one-pass direction (D passes of the full network = D)")
    for label, r in by_label.items():
        for sequential, one_pass in (
            ("maf sample", "maf log_prob"),
            ("iaf log_prob foreign", "iaf rsample+log_prob"),
        ):
            if label.startswith(sequential + " "):
                tag = label[len(sequential) + 1 :]
                reference = by_label[f"{one_pass} {tag}"]
                print(
                    f"  {sequential + ' ' + tag:<40} pyro_nf {r['ours_ms'] / reference['ours_ms']:6.1f}"
                    f"   pyro {r['reference_ms'] / reference['reference_ms']:6.1f}"
                )


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--couplings", nargs="+", default=["affine", "spline"])
    args = parse_arguments(parser)
    device = torch.device(args.device)
    hidden, layers, batch = [256, 256], 5, args.batch
    if args.quick:
        hidden, layers, batch, args.dims = [16, 16], 2, 64, [4]
    print(
        f"autoregressive flows: {layers} layers, hidden {hidden}, batch {batch}, float32, "
        f"{device}, {torch.get_num_threads()} threads"
    )
    rows = [
        row
        for dim in args.dims
        for coupling in args.couplings
        for row in rows_for(dim, coupling, batch, layers, hidden, device)
    ]
    results = run_rows(rows, min_run_time=args.min_run_time, device=args.device, rounds=args.rounds)
    sequential_costs(results)


if __name__ == "__main__":
    main()
