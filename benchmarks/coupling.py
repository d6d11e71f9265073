"""Real NVP (pyro_nf.realnvp) against Pyro's AffineCoupling stack of the same architecture.

Both stacks have 8 affine coupling layers whose conditioners are MLPs with hidden sizes
[256, 256] (ReLU), alternate the two halves between layers and use float32. Pyro's
AffineCoupling always transforms the second half, so its stack alternates the halves
with a reverse permutation between layers; pyro_nf's Coupling alternates the halves
through its masks and needs no extra layer.

Every log_prob call gets a fresh tensor (a clone): Pyro's identity-keyed cache would
otherwise skip the computation for a repeated input.

    python benchmarks/coupling.py              # D = 16 and 64, batch 4096
    python benchmarks/coupling.py --quick      # tiny sizes, a smoke test
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from timing import Row, common_arguments, parse_arguments, run_rows, synchronized

import pyro_nf


def pyro_realnvp(dim: int, num_layers: int, hidden_dims: list[int]) -> list:
    layers = []
    for i in range(num_layers):
        layers.append(T.affine_coupling(dim, hidden_dims=hidden_dims))
        if i < num_layers - 1:
            layers.append(T.Permute(torch.arange(dim - 1, -1, -1)))
    return layers


def rows_for(
    dim: int, batch: int, num_layers: int, hidden: list[int], device: torch.device
) -> list[Row]:
    torch.manual_seed(0)
    flow = pyro_nf.realnvp(dim, num_layers=num_layers, hidden_dims=hidden).to(device)
    reference_layers = pyro_realnvp(dim, num_layers, hidden)
    reference_modules = torch.nn.ModuleList(
        [t for t in reference_layers if isinstance(t, torch.nn.Module)]
    )
    reference_modules.to(device)
    base = dist.Normal(torch.zeros(dim, device=device), torch.ones(dim, device=device)).to_event(1)
    reference = dist.TransformedDistribution(base, reference_layers)
    x = torch.randn(batch, dim, device=device)

    def timed(fn):
        return synchronized(fn, device)

    @torch.no_grad()
    def ours_log_prob():
        return flow().log_prob(x.clone())

    @torch.no_grad()
    def reference_log_prob():
        return reference.log_prob(x.clone())

    def ours_step():
        flow.zero_grad(set_to_none=True)
        loss = -flow().log_prob(x.clone()).mean()
        loss.backward()

    def reference_step():
        reference_modules.zero_grad(set_to_none=True)
        loss = -reference.log_prob(x.clone()).mean()
        loss.backward()

    tag = f"D={dim}"
    return [
        Row(f"realnvp log_prob {tag}", timed(ours_log_prob), timed(reference_log_prob)),
        Row(
            f"realnvp sample {tag}",
            timed(lambda: flow().sample((batch,))),
            timed(lambda: reference.sample((batch,))),
        ),
        Row(f"realnvp train step {tag}", timed(ours_step), timed(reference_step)),
    ]


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    args = parse_arguments(parser)
    device = torch.device(args.device)
    hidden, layers, batch = [256, 256], 8, args.batch
    if args.quick:
        hidden, layers, batch, args.dims = [16], 2, 64, [4]
    print(
        f"coupling flows: {layers} layers, hidden {hidden}, batch {batch}, float32, {device}, "
        f"{torch.get_num_threads()} threads"
    )
    rows = [row for dim in args.dims for row in rows_for(dim, batch, layers, hidden, device)]
    run_rows(rows, min_run_time=args.min_run_time, device=args.device, rounds=args.rounds)


if __name__ == "__main__":
    main()
