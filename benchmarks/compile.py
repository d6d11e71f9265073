"""torch.compile against eager mode for each family: log_prob, rsample + log_prob, and a
training step (loss and backward), side by side in one run.

Prints the compile time (the first call) and the steady-state medians; the ratio is
compiled / eager (below 1: compiling pays). Correctness of the compiled graphs is in
``tests/test_compile.py``; speed is only measured here.

    python benchmarks/compile.py                 # D = 16, batch 4096, default backend
    python benchmarks/compile.py --quick         # tiny sizes, seconds
"""

from __future__ import annotations

import time

import torch
from timing import Row, common_arguments, parse_arguments, run_rows

from pyro_nf.flows import FLOW_BUILDERS


def rows_for(family: str, dim: int, batch: int, hidden: int, backend: str) -> list[Row]:
    torch.manual_seed(0)
    flow = FLOW_BUILDERS[family](dim, num_layers=5, hidden_dims=(hidden, hidden))
    data = torch.randn(batch, dim)

    def log_prob() -> torch.Tensor:
        # A fresh tensor per call: eager mode would answer a repeated one from the
        # transforms' pair cache, and time no pass at all.
        return flow.log_prob(data.clone())

    def draw_and_score() -> torch.Tensor:
        # One pass per layer with or without the pair cache (which is off under compile).
        return flow.rsample_and_log_prob((batch,))[1]

    def loss() -> torch.Tensor:
        return -flow.log_prob(data.clone()).mean()

    compiled_log_prob = torch.compile(log_prob, backend=backend)
    compiled_draw_and_score = torch.compile(draw_and_score, backend=backend)
    compiled_loss = torch.compile(loss, backend=backend)

    def step(function):
        def run() -> None:
            flow.zero_grad(set_to_none=True)
            function().backward()

        return run

    rows = []
    for label, compiled, eager in (
        ("log_prob", compiled_log_prob, log_prob),
        ("rsample_and_log_prob", compiled_draw_and_score, draw_and_score),
        ("training step", step(compiled_loss), step(loss)),
    ):
        start = time.perf_counter()
        compiled()
        seconds = time.perf_counter() - start
        rows.append(
            Row(
                f"{family} {label} (compile {seconds:.1f} s)",
                compiled,
                eager,
                reference_name="eager",
            )
        )
    return rows


def main() -> None:
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--families", nargs="+", default=["realnvp", "maf", "iaf"])
    args = parse_arguments(parser)
    if args.quick:
        args.dim, args.hidden, args.batch, args.min_run_time = 4, 16, 64, 0.05
    print(f"compiled ({args.backend}) / eager; D={args.dim}, batch {args.batch}, 5 layers")
    rows = [
        row
        for family in args.families
        for row in rows_for(family, args.dim, args.batch, args.hidden, args.backend)
    ]
    run_rows(rows, args.min_run_time, rounds=args.rounds)


if __name__ == "__main__":
    main()
