"""Continuous flows: speed, function evaluations and memory, side by side with zuko's CNF.

Three tables:

1. Time per operation (median, ``benchmarks/timing.py``) of ``log_prob`` (no grad),
   ``sample`` and a training step (``-log_prob(x).mean()``, backward, Adam step) for
   D = 2 with the exact trace and D = 16 with Hutchinson's estimator; dynamics with
   hidden sizes (64, 64), batch 1024, rtol = atol = 1e-5, dopri5; against zuko's
   ``CNF`` with the same hidden sizes and tolerances (zuko has its own
   Dormand-Prince solver and an adaptive-checkpoint adjoint).
2. Function evaluations (NFE) of the same operations, forward solve / backward pass.
   Adaptive solvers take as many steps as the dynamics need, so time differences
   between the libraries are mostly NFE differences; ms per NFE compares the cost
   of one evaluation. Both start untrained: ours near the identity (the last layer is
   scaled down), zuko's from PyTorch's default initialization, or, with
   ``--match-init``, with its last layer scaled down the same way.
3. Memory of a training step with ``adjoint=True`` and ``adjoint=False`` as the number
   of fixed rk4 steps grows (D = 2, exact trace, hidden (64, 64), batch 256), measured
   two ways:

   * *graph MB*: the bytes of the tensors that autograd holds for the backward pass
     at the end of the forward pass (``torch.autograd.graph.saved_tensors_hooks``,
     counting each storage once and only the saved tensors still alive). This is
     exactly what backpropagation through the solver must keep and the adjoint does
     not; it is deterministic.
   * *peak RSS MB*: the peak resident memory of the process during one training step
     minus the resident memory before it (Linux: the peak is reset through
     ``/proc/self/clear_refs``), each in a fresh subprocess after a warm-up step, so it
     includes the backward pass's transient memory (the adjoint solve) and allocator
     effects. Noisier; on a GPU one would read ``torch.cuda.max_memory_allocated``.

Run from the repository root (pyro_nf importable, e.g. installed or on PYTHONPATH)::

    python benchmarks/continuous.py              # the three tables
    python benchmarks/continuous.py --quick      # tiny sizes, a smoke test
    python benchmarks/continuous.py --threads 1  # on a busy machine
    python benchmarks/continuous.py --match-init --skip-memory  # same start as zuko
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import weakref
from collections.abc import Callable

import torch
from timing import Row, common_arguments, median_seconds, parse_arguments, run_rows

import pyro_nf
from pyro_nf import datasets
from pyro_nf.transforms import ContinuousFlow

try:
    import zuko
except ImportError:  # an optional benchmark dependency (the "benchmarks" extra)
    zuko = None

HIDDEN = (64, 64)
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- models
def make_data(dim: int, batch: int) -> torch.Tensor:
    if dim == 2:
        return datasets.two_moons(batch, seed=0)
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(dim, dim, generator=generator) / dim**0.5
    return torch.randn(batch, dim, generator=generator) @ mixing.T + 0.5


def make_ours(dim: int, trace: str, **kwargs) -> pyro_nf.Flow:
    options = {"rtol": TOLERANCE, "atol": TOLERANCE, **kwargs}
    return pyro_nf.cnf(dim, hidden_dims=HIDDEN, trace=trace, **options)


def make_zuko(dim: int, exact: bool, match_init: bool = False):
    flow = zuko.flows.CNF(dim, hidden_features=HIDDEN, atol=TOLERANCE, rtol=TOLERANCE, exact=exact)
    if match_init:
        # Start near the identity like pyro_nf's dynamics (last layer scaled by 1e-2).
        last = flow.transform.ode[-1]
        with torch.no_grad():
            last.weight.mul_(1e-2)
            last.bias.zero_()
    return flow


class Counter:
    """Counts calls of a module through a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1


def operations(flow, data: torch.Tensor, zuko_flow: bool) -> dict[str, Callable[[], object]]:
    """log_prob (no grad), sample and a training step for one flow."""
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    batch = data.shape[0]

    def log_prob():
        with torch.no_grad():
            # A fresh tensor each time: the transform's cache must not answer.
            return (flow() if zuko_flow else flow).log_prob(data.clone())

    def sample():
        with torch.no_grad():
            return flow().sample((batch,))

    def train_step():
        optimizer.zero_grad()
        loss = -(flow() if zuko_flow else flow).log_prob(data).mean()
        loss.backward()
        optimizer.step()
        return loss

    return {"log_prob": log_prob, "sample": sample, "train step": train_step}


def count_ours(flow: pyro_nf.Flow, operation: Callable[[], object], train: bool) -> tuple:
    blocks = [layer for layer in flow.layers if isinstance(layer, ContinuousFlow)]
    operation()
    forward = sum(block.ode.nfe_forward for block in blocks)
    backward = sum(block.ode.nfe_backward for block in blocks)
    return forward, (backward if train else None)


def count_zuko(counter: Counter, flow, data: torch.Tensor, name: str) -> tuple:
    counter.calls = 0
    if name == "train step":
        loss = -flow().log_prob(data).mean()
        forward = counter.calls
        loss.backward()
        return forward, counter.calls - forward
    operations(flow, data, True)[name]()
    return counter.calls, None


# ----------------------------------------------------------------------------- speed
def speed(args) -> None:
    configs = [(2, "exact"), (16, "hutchinson")]
    batch = 64 if args.quick else args.batch
    rows, nfe_rows = [], []
    for dim, trace in configs:
        data = make_data(dim, batch)
        torch.manual_seed(0)
        ours = make_ours(dim, trace)
        ours_ops = operations(ours, data, False)
        if zuko is not None:
            torch.manual_seed(0)
            reference = make_zuko(dim, exact=trace == "exact", match_init=args.match_init)
            counter = Counter(reference.transform.ode)
            reference_ops = operations(reference, data, True)
        for name in ours_ops:
            label = f"D={dim} {trace} {name}"
            ours_nfe = count_ours(ours, ours_ops[name], train=name == "train step")
            if zuko is None:
                seconds = median_seconds(ours_ops[name], args.min_run_time)
                print(f"{label:<46} {1e3 * seconds:>13.2f}   (zuko not installed)", flush=True)
                nfe_rows.append((label, ours_nfe, None, 1e3 * seconds, None))
                continue
            zuko_nfe = count_zuko(counter, reference, data, name)
            rows.append(Row(label, ours_ops[name], reference_ops[name], "zuko"))
            nfe_rows.append((label, ours_nfe, zuko_nfe, None, None))
    if rows:
        parameters = {
            dim: (
                sum(p.numel() for p in make_ours(dim, "exact").parameters()),
                sum(p.numel() for p in make_zuko(dim, True).parameters()),
            )
            for dim, _ in configs
        }
        print(f"parameters (pyro_nf, zuko): {parameters}")
        init = " (last layer scaled by 1e-2)" if args.match_init else ""
        print(f"reference: zuko.flows.CNF{init}")
        results = run_rows(rows, args.min_run_time)
        for i, result in enumerate(results):
            label, ours_nfe, zuko_nfe, _, _ = nfe_rows[i]
            nfe_rows[i] = (label, ours_nfe, zuko_nfe, result["ours_ms"], result["reference_ms"])
    print()
    header = (
        f"{'operation':<34} {'pyro_nf NFE fwd/bwd':>20} {'zuko NFE fwd/bwd':>17} "
        f"{'pyro_nf ms/NFE':>15} {'zuko ms/NFE':>12}"
    )
    print(header)
    print("-" * len(header))
    for label, ours_nfe, zuko_nfe, ours_ms, zuko_ms in nfe_rows:
        print(
            f"{label:<34} {_nfe(ours_nfe):>20} {_nfe(zuko_nfe):>17} "
            f"{_per(ours_ms, ours_nfe):>15} {_per(zuko_ms, zuko_nfe):>12}"
        )


def _nfe(nfe: tuple | None) -> str:
    if nfe is None:
        return "-"
    forward, backward = nfe
    return f"{forward}" if backward is None else f"{forward}/{backward}"


def _per(ms: float | None, nfe: tuple | None) -> str:
    if ms is None or nfe is None:
        return "-"
    total = nfe[0] + (nfe[1] or 0)
    return f"{ms / total:.2f}"


# ----------------------------------------------------------------------------- memory
class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def graph_bytes(loss_fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the saved tensors the autograd graph holds when ``loss_fn`` returns."""
    alive: weakref.WeakSet = weakref.WeakSet()

    def pack(tensor: torch.Tensor) -> _Saved:
        # Detached: a saved output holding its own grad_fn would form a reference cycle
        # that keeps every evaluation's graph alive and inflates the count.
        saved = _Saved(tensor.detach())
        alive.add(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        loss = loss_fn()
    storages = {}
    for saved in list(alive):
        storage = saved.tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()), loss


def memory_flow(adjoint: bool, steps: int) -> pyro_nf.Flow:
    torch.manual_seed(0)
    options = {"step_size": 1.0 / steps}
    return make_ours(2, "exact", adjoint=adjoint, method="rk4", options=options)


def _memory_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(adjoint: bool, steps: int, batch: int) -> None:
    """One training step in this (fresh) process; prints the peak-RSS increase in MB.

    Linux: the peak (VmHWM) is reset just before the step through
    ``/proc/self/clear_refs``, and the increase is the peak during the step minus the
    resident memory before it. Elsewhere: the increase of ``ru_maxrss``, which misses
    a step whose peak stays below an earlier one.
    """
    data = make_data(2, batch)
    warm = memory_flow(adjoint, 1)
    (-warm.log_prob(data[:8]).mean()).backward()  # loads lazily initialized code
    flow = memory_flow(adjoint, steps)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _memory_status_kb("VmRSS")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = -flow.log_prob(data).mean()
    loss.backward()
    try:
        after = _memory_status_kb("VmHWM")
    except OSError:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": (after - before) / 1024}))


def peak_rss_mb(adjoint: bool, steps: int, batch: int, threads: int | None) -> float:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child"]
    command += [str(int(adjoint)), str(steps), str(batch)]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(output.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def memory(args) -> None:
    steps_list = (2, 4) if args.quick else (8, 16, 32, 64)
    batch = 64 if args.quick else 256
    print(f"\nmemory of one training step: D=2 exact trace, hidden {HIDDEN}, batch {batch}, rk4")
    header = (
        f"{'rk4 steps':>9} {'NFE':>5} {'adjoint graph MB':>17} {'direct graph MB':>16} "
        f"{'adjoint peak RSS MB':>20} {'direct peak RSS MB':>19}"
    )
    print(header)
    print("-" * len(header))
    data = make_data(2, batch)
    for steps in steps_list:
        cells = []
        for adjoint in (True, False):
            flow = memory_flow(adjoint, steps)
            held, loss = graph_bytes(lambda flow=flow: -flow.log_prob(data).mean())
            loss.backward()
            cells.append(held / 2**20)
        nfe = flow.layers[0].ode.nfe_forward
        rss = [peak_rss_mb(adjoint, steps, batch, args.threads) for adjoint in (True, False)]
        print(
            f"{steps:>9} {nfe:>5} {cells[0]:>17.2f} {cells[1]:>16.2f} {rss[0]:>20.1f} "
            f"{rss[1]:>19.1f}",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(bool(int(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = common_arguments(__doc__.splitlines()[0])
    parser.set_defaults(batch=1024)
    parser.add_argument(
        "--match-init", action="store_true", help="scale zuko's last layer like ours"
    )
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parse_arguments(parser)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    if zuko is None:
        print("zuko is not installed (pip install zuko): timing pyro_nf alone")
    else:
        print(f"zuko {zuko.__version__}")
    if not args.skip_speed:
        speed(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
