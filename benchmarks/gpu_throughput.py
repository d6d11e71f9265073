"""Throughput of each flow family on CPU and on a CUDA device: samples per second.

For each family (real NVP, MAF, IAF, CNF; 8 dimensions) and batch size (256 to
65,536), three operations are timed with ``torch.utils.benchmark`` (medians, the
device synchronized inside the timed call):

- ``log_prob``: ``flow.log_prob(x)`` without gradients (x -> z, density);
- ``rsample+log_prob``: ``x = flow.rsample((B,)); flow.log_prob(x)`` without gradients
  (z -> x, then the cached log-density: the VI pattern);
- ``train step``: ``-flow.log_prob(x).mean()``, backward and an Adam step.

Each is run in float32 on every device, and under ``torch.autocast`` with bfloat16
on CUDA for the families whose math allows it (not the CNF: an adaptive ODE solver's
tolerances mean nothing at bfloat16 precision; reported as ``n/a``). A run that
raises is reported as ``error`` and makes the script exit with status 1.

Run::

    python benchmarks/gpu_throughput.py                     # CPU and CUDA
    python benchmarks/gpu_throughput.py --devices cpu --batches 256 --families realnvp
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import synchronized  # noqa: E402

import pyro_nf  # noqa: E402

FAMILIES = ("realnvp", "maf", "iaf", "cnf")
OPERATIONS = ("log_prob", "rsample+log_prob", "train step")
NO_BF16 = {"cnf"}


def build(family: str, dim: int, device: str) -> pyro_nf.Flow:
    torch.manual_seed(0)
    if family == "cnf":
        flow = pyro_nf.cnf(dim, hidden_dims=(64, 64), rtol=1e-3, atol=1e-3)
    else:
        builder = {"realnvp": pyro_nf.realnvp, "maf": pyro_nf.maf, "iaf": pyro_nf.iaf}[family]
        flow = builder(dim, num_layers=4, hidden_dims=(64, 64))
    return flow.to(device)


def operation(flow: pyro_nf.Flow, name: str, batch: int, device: str) -> Callable[[], object]:
    x = torch.randn(batch, flow.dim, device=device)
    if name == "log_prob":
        # A new tensor per call: the same one would be answered from the pair cache.
        return torch.no_grad()(lambda: flow.log_prob(x.clone()))
    if name == "rsample+log_prob":
        return torch.no_grad()(lambda: flow.log_prob(flow.rsample((batch,))))
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad()
        (-flow.log_prob(x.clone()).mean()).backward()
        optimizer.step()

    return step


def samples_per_second(
    fn: Callable[[], object], batch: int, device: str, bf16: bool, min_run_time: float
) -> float:
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )

    def run() -> object:
        with autocast:
            return fn()

    timed = synchronized(run, torch.device(device))
    timed()  # warm-up: lazy initialization and kernel selection
    timer = benchmark.Timer(stmt="fn()", globals={"fn": timed})
    return batch / timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    parser.add_argument("--devices", nargs="+", default=default_devices)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args(argv)

    columns = [(d, "float32") for d in args.devices]
    columns += [(d, "bf16") for d in args.devices if d.startswith("cuda")]
    header = ["family", "operation", "batch", *(f"{d} {p}" for d, p in columns)]
    rows, failures = [], 0
    for family in args.families:
        flows = {device: build(family, args.dim, device) for device in args.devices}
        for name in OPERATIONS:
            for batch in args.batches:
                row = [family, name, str(batch)]
                for device, precision in columns:
                    if precision == "bf16" and family in NO_BF16:
                        row.append("n/a")
                        continue
                    try:
                        fn = operation(flows[device], name, batch, device)
                        rate = samples_per_second(
                            fn, batch, device, precision == "bf16", args.min_run_time
                        )
                        row.append(f"{rate:,.0f}")
                    except Exception as error:  # reported, counted, and the run goes on
                        failures += 1
                        row.append("error")
                        print(
                            f"[throughput] {family} {name} {batch} {device} {precision}: "
                            f"{type(error).__name__}: {error}",
                            file=sys.stderr,
                        )
                rows.append(row)
                print("  ".join(row), flush=True)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("\nsamples per second (higher is better)")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
