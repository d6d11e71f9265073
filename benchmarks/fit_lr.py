"""``pyro_nf.fit``'s learning rate on the density suite's toys: which default trains best.

Each flow family at its builder's defaults is trained by ``fit`` at its defaults (100
epochs, batches of 256, early stopping with patience 10 on a 10% validation split,
constant-rate Adam) on a finite training set of the toy, once per learning rate, and
scored by the held-out NLL of fresh points (nats per point, ± standard error), with
the epochs run and the CPU seconds::

    python benchmarks/fit_lr.py                                  # every toy, three rates
    python benchmarks/fit_lr.py --toys rings student_t --lrs 1e-3 3e-3 --families maf

The family ``"cnf flow matching"`` is ``cnf()`` at its defaults trained by
``fit(..., objective="flow_matching")``; ``--epochs`` and ``--patience`` replace fit's
defaults (100 and 10) for every family::

    python benchmarks/fit_lr.py --families "cnf flow matching" --epochs 1000 --patience 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import density  # noqa: E402

import pyro_nf  # noqa: E402

#: name -> the flow ``fit`` trains (each builder at its defaults, but for the base).
FAMILIES: dict[str, Callable[[int], pyro_nf.Flow]] = {
    "realnvp": lambda d: pyro_nf.realnvp(d),
    "spline coupling": lambda d: pyro_nf.realnvp(d, coupling_function="spline"),
    "spline coupling t": lambda d: pyro_nf.realnvp(d, coupling_function="spline", base="student_t"),
    "maf": lambda d: pyro_nf.maf(d),
    "cnf flow matching": lambda d: pyro_nf.cnf(d),
}

#: the families that ``fit`` trains by another objective than the likelihood.
OBJECTIVES = {"cnf flow matching": "flow_matching"}


def run(toy: str, family: str, lr: float, args: argparse.Namespace) -> dict:
    sample = density.toy_sampler(toy)
    train = sample(args.num_train, args.seed)
    test = sample(args.test_points, 10**6 + args.seed)
    torch.manual_seed(args.seed)
    flow = FAMILIES[family](train.shape[1])
    start = time.process_time()
    try:
        options = {"objective": OBJECTIVES.get(family, "likelihood")}
        if args.epochs is not None:
            options["epochs"] = args.epochs
        if args.patience is not None:  # 0: no early stopping
            options["patience"] = args.patience or None
        history = pyro_nf.fit(flow, train, lr=lr, seed=args.seed, progress=False, **options)
        epochs = history.epochs_run
    except FloatingPointError:
        epochs = -1
    seconds = time.process_time() - start
    flow.eval()
    mean, error = density.nll_and_error(flow, test) if epochs >= 0 else (math.nan, math.nan)
    row = {"toy": toy, "family": family, "lr": lr, "nll": mean, "se": error}
    row.update(epochs=epochs, seconds=seconds)
    print(
        f"{toy:16s} {family:18s} lr {lr:<7g} NLL {mean:7.3f} ± {error:.3f}"
        f"  {epochs:4d} epochs  {seconds:6.1f} s",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toys", nargs="+", default=list(density.TOYS))
    parser.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILIES),
        default=[name for name in FAMILIES if name not in OBJECTIVES],
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--num-train", type=int, default=4000, help="training points")
    parser.add_argument("--epochs", type=int, default=None, help="fit's epochs (default 100)")
    parser.add_argument(
        "--patience", type=int, default=None, help="fit's patience (default 10; 0: none)"
    )
    parser.add_argument("--test-points", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [
        run(toy, family, lr, args)
        for toy in args.toys
        for family in args.families
        for lr in args.lrs
    ]
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
