"""The continuous family at equal work: one vector field, three integrators of it.

pyro-nf's CNF (:class:`pyro_nf.transforms.ContinuousFlow` inside a :class:`pyro_nf.Flow`),
a plain torchdiffeq FFJORD-style reference written here (``odeint`` of the augmented
state ``[z, log-det]`` with the exact trace from one batched autograd call) and zuko's
``zuko.flows.CNF`` all integrate **the same** ``nn.Module``: one
:class:`pyro_nf.nn.ODEDynamics` (seeded, last layer scaled up so the field is not
near zero, ``FIELD_SCALE``), wrapped once in a counter of its calls. zuko's own MLP field is replaced
by it (``transform.ode``, ``transform.f``) and its integration times are set to
``(1, 0)``, so zuko's density solve runs x = z(1) -> z(0) like the other two. Same
tolerances (``rtol = atol = 1e-5``), Dormand-Prince 5(4) everywhere: torchdiffeq's
``dopri5`` for pyro-nf and the reference, zuko's own ``dopri45`` for zuko.

Reported, per configuration (D, batch):

* **log_prob** (no grad): function evaluations (NFE, the counter's calls), time (the
  fastest of ``--rounds`` medians, every operation of a configuration timed in turn),
  time per evaluation, and the per-evaluation overhead: time per evaluation minus a
  bare evaluation of the field with its exact trace (what one solver stage must do);
  ``bare f`` is the field alone. Agreement: max |log p - log p_true| over the batch,
  ``log p_true`` from the reference in float64 at ``rtol = atol = 1e-10``.
* **training step** (``-log_prob(x).mean()`` and its backward pass): with the
  adjoint (pyro-nf's default, seminorm adjoint; the reference with torchdiffeq's
  plain adjoint as FFJORD has it, and with the seminorm), backpropagation through the
  solver (``direct``), and zuko's adaptive-checkpoint adjoint (its only gradient
  method). NFE forward / backward, time (as above), and the peak resident memory of one
  step over the memory before it, in a fresh process per cell (Linux: the peak is
  reset through ``/proc/self/clear_refs``).

    python benchmarks/cnf_work.py             # full run (a few minutes on 2 cores)
    python benchmarks/cnf_work.py --quick     # smoke test
    python benchmarks/cnf_work.py --profile   # cProfile of pyro-nf's and the reference's log_prob
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

import pyro_nf
from pyro_nf.nn import ODEDynamics
from pyro_nf.transforms import ContinuousFlow

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' helpers
from timing import median_seconds  # noqa: E402

TOLERANCE = 1e-5
HIDDEN = (64, 64)
# The last layer's weights at 8x PyTorch's default initialization: a field strong enough
# that dopri5 takes several steps (NFE about 30 at D = 2), like a trained CNF's, where
# the default near-identity start of pyro-nf's dynamics would be solved in one or two.
FIELD_SCALE = 8.0
CONFIGS = ((2, 64), (2, 1024), (8, 1024))
QUICK_CONFIGS = ((2, 16),)


# ------------------------------------------------------------------------ the field


class CountedField(nn.Module):
    """The shared vector field ``f(t, z)``, counting its calls (every library's stages)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.dim = field.dim
        self.context_dim = 0
        self.calls = 0

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.field(t, z)


def make_field(dim: int, seed: int = 0) -> CountedField:
    torch.manual_seed(seed)
    return CountedField(ODEDynamics(dim, HIDDEN, final_init_scale=FIELD_SCALE))


def make_data(dim: int, batch: int, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * torch.log(torch.tensor(2 * torch.pi)))


# ------------------------------------------------------------------- the three models


class FFJORDReference(nn.Module):
    r"""FFJORD in a few lines: ``d[z, l]/dt = [f(t, z), tr(df/dz)]`` solved from 1 to 0.

    ``log p(x) = log N(z(0); 0, I) + l(0)`` with ``z(1) = x, l(1) = 0`` (so
    :math:`l(0) = -\int_0^1 \operatorname{tr}(\partial f/\partial z)\,dt`).
    """

    def __init__(
        self, field: nn.Module, adjoint: bool, rtol: float, atol: float, seminorm: bool = False
    ) -> None:
        super().__init__()
        self.field = field
        self.adjoint = adjoint
        self.rtol, self.atol = rtol, atol
        self.adjoint_options = {"norm": "seminorm"} if seminorm else None

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[0] if state[0].requires_grad else state[0].detach().requires_grad_(True)
            f = self.field(t, z)
            dim = z.shape[-1]
            basis = torch.eye(dim, dtype=z.dtype).reshape(dim, 1, dim).expand(dim, *z.shape)
            (rows,) = torch.autograd.grad(
                f, z, basis, create_graph=create_graph, is_grads_batched=True
            )
        trace = rows.diagonal(dim1=0, dim2=-1).sum(-1)
        return f, trace

    def log_prob(self, x: Tensor) -> Tensor:
        state = (x, x.new_zeros(x.shape[:-1]))
        times = x.new_tensor([1.0, 0.0])
        options = {"rtol": self.rtol, "atol": self.atol, "method": "dopri5"}
        if self.adjoint:
            options["adjoint_params"] = tuple(self.field.parameters())
            options["adjoint_options"] = self.adjoint_options
            z, log_det = odeint_adjoint(self, state, times, **options)
        else:
            z, log_det = odeint(self, state, times, **options)
        return standard_normal_log_prob(z[-1]) + log_det[-1]


def pyro_nf_flow(field: nn.Module, adjoint: bool, rtol: float, atol: float) -> pyro_nf.Flow:
    dim = field.dim
    transform = ContinuousFlow(dim, dynamics=field, adjoint=adjoint, rtol=rtol, atol=atol)
    return pyro_nf.Flow([transform], dim)


def zuko_cnf(field: nn.Module, rtol: float, atol: float):
    import zuko

    flow = zuko.flows.CNF(field.dim, atol=atol, rtol=rtol, exact=True)
    transform = flow.transform
    transform.ode = field  # zuko's MLP field replaced by the shared one
    transform.f = lambda t, x, c=None: transform.ode(t, x)  # no time embedding
    transform.times = torch.tensor([1.0, 0.0])  # density: x = z(1) -> z(0), as the others
    return flow


@dataclass
class Model:
    """One library's log-density of the shared field, and the field's counter."""

    name: str
    log_prob: Callable[[Tensor], Tensor]
    field: CountedField


def models(field: CountedField, rtol: float = TOLERANCE, atol: float = TOLERANCE) -> dict:
    """Every integrator of ``field`` by name: the ``log_prob`` of each."""
    ours = {adjoint: pyro_nf_flow(field, adjoint, rtol, atol) for adjoint in (True, False)}
    reference = {
        "adjoint": FFJORDReference(field, True, rtol, atol),
        "seminorm": FFJORDReference(field, True, rtol, atol, seminorm=True),
        "direct": FFJORDReference(field, False, rtol, atol),
    }
    table = {
        "pyro-nf (adjoint, seminorm)": ours[True].log_prob,
        "pyro-nf (direct)": ours[False].log_prob,
        "torchdiffeq FFJORD (adjoint)": reference["adjoint"].log_prob,
        "torchdiffeq FFJORD (adjoint, seminorm)": reference["seminorm"].log_prob,
        "torchdiffeq FFJORD (direct)": reference["direct"].log_prob,
    }
    try:
        zuko = zuko_cnf(field, rtol, atol)
        table["zuko CNF (checkpoint adjoint)"] = lambda x: zuko().log_prob(x)
    except ImportError:  # zuko is an optional benchmark dependency
        pass
    return {name: Model(name, log_prob, field) for name, log_prob in table.items()}


# density evaluation needs no gradient method: one row per library
LOG_PROB_MODELS = ("pyro-nf (adjoint, seminorm)", "torchdiffeq FFJORD (adjoint)")
LOG_PROB_ZUKO = "zuko CNF (checkpoint adjoint)"


# ---------------------------------------------------------------------- measurements


def true_log_prob(field: CountedField, x: Tensor) -> Tensor:
    exact = FFJORDReference(copy.deepcopy(field.field).double(), False, 1e-10, 1e-10)
    with torch.no_grad():
        return exact.log_prob(x.double())


def bare_operations(field: CountedField, x: Tensor, t: Tensor) -> tuple[Callable, Callable]:
    """A bare evaluation of the field, and one with its exact trace (no graph kept)."""
    dim = x.shape[-1]

    def bare() -> Tensor:
        with torch.no_grad():
            return field(t, x)

    def with_trace() -> Tensor:
        z = x.detach().requires_grad_(True)
        f = field(t, z)
        basis = torch.eye(dim).reshape(dim, 1, dim).expand(dim, *z.shape)
        (rows,) = torch.autograd.grad(f, z, basis, is_grads_batched=True)
        return rows.diagonal(dim1=0, dim2=-1).sum(-1)

    return bare, with_trace


def fastest_seconds(
    operations: dict[str, Callable[[], object]], min_run_time: float, rounds: int
) -> dict[str, float]:
    """The smallest of ``rounds`` medians per operation, the operations taken in turn.

    On a shared machine load from other processes only ever adds time, and taking the
    operations in alternation spreads a burst of it over all of them.
    """
    best = dict.fromkeys(operations, float("inf"))
    for _ in range(rounds):
        for name, operation in operations.items():
            best[name] = min(best[name], median_seconds(operation, min_run_time))
    return best


def log_prob_operation(model: Model, x: Tensor) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return model.log_prob(x.clone())  # a fresh tensor: no cache may answer

    return run


def log_prob_row(model: Model, x: Tensor, truth: Tensor, seconds: float) -> dict:
    model.field.calls = 0
    value = log_prob_operation(model, x)()
    nfe = model.field.calls
    return {
        "model": model.name,
        "nfe": nfe,
        "ms": 1e3 * seconds,
        "ms_per_nfe": 1e3 * seconds / nfe,
        "max_error": float((value.double() - truth).abs().max()),
    }


def train_step(model: Model, x: Tensor) -> Callable[[], tuple[int, int]]:
    """One ``-log_prob(x).mean()`` forward and backward pass; returns the NFE of each."""

    def step() -> tuple[int, int]:
        model.field.zero_grad(set_to_none=True)
        model.field.calls = 0
        loss = -model.log_prob(x.clone()).mean()
        forward = model.field.calls
        loss.backward()
        return forward, model.field.calls - forward

    return step


def peak_rss_mb(name: str, dim: int, batch: int, script: str = __file__) -> float:
    """Peak resident memory of one training step of ``name``, in a fresh process."""
    command = [sys.executable, script, "--memory-child", name, str(dim), str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(output.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name: str, dim: int, batch: int) -> None:
    """One training step in this fresh process, after a warm-up step on a few rows."""
    torch.set_num_threads(1)
    model = models(make_field(dim))[name]
    x = make_data(dim, batch)
    train_step(model, x[:4])()  # loads lazily initialized code
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS
        before = _status_kb("VmRSS")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(model, x)()
    try:
        after = _status_kb("VmHWM")
    except OSError:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": (after - before) / 1024}))


def measure(dim: int, batch: int, min_run_time: float, rounds: int, memory: bool) -> dict:
    field = make_field(dim)
    x = make_data(dim, batch)
    truth = true_log_prob(field, x)
    table = models(field)
    t = torch.tensor(0.5)
    log_prob_names = [*LOG_PROB_MODELS, *([LOG_PROB_ZUKO] if LOG_PROB_ZUKO in table else [])]
    bare, bare_with_trace = bare_operations(field, x, t)
    operations: dict[str, Callable[[], object]] = {
        "bare f": bare,
        "bare f + trace": bare_with_trace,
    }
    operations.update({name: log_prob_operation(table[name], x) for name in log_prob_names})
    steps = {name: train_step(model, x) for name, model in table.items()}
    operations.update({f"train {name}": step for name, step in steps.items()})
    seconds = fastest_seconds(operations, min_run_time, rounds)
    bare_trace = seconds["bare f + trace"]
    log_prob_rows = []
    for name in log_prob_names:
        row = log_prob_row(table[name], x, truth, seconds[name])
        row["overhead_ms_per_nfe"] = row["ms_per_nfe"] - 1e3 * bare_trace
        log_prob_rows.append(row)
    train_rows = []
    for name, step in steps.items():
        forward, backward = step()
        row = {"model": name, "nfe_forward": forward, "nfe_backward": backward}
        row["ms"] = 1e3 * seconds[f"train {name}"]
        row["ms_per_nfe"] = row["ms"] / (forward + backward)
        if memory:
            row["peak_rss_mb"] = peak_rss_mb(name, dim, batch)
        train_rows.append(row)
    return {
        "dim": dim,
        "batch": batch,
        "bare_f_ms": 1e3 * seconds["bare f"],
        "bare_f_trace_ms": 1e3 * bare_trace,
        "log_prob": log_prob_rows,
        "train": train_rows,
    }


def markdown(result: dict) -> str:
    dim, batch = result["dim"], result["batch"]
    lines = [
        f"\n**D = {dim}, batch {batch}**: bare f {result['bare_f_ms']:.3f} ms, "
        f"bare f + exact trace {result['bare_f_trace_ms']:.3f} ms\n",
        "| log_prob (no grad) | NFE | ms | ms/NFE | overhead ms/NFE | max \\|Δ log p\\| |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["log_prob"]:
        lines.append(
            f"| {row['model']} | {row['nfe']} | {row['ms']:.2f} | {row['ms_per_nfe']:.3f} | "
            f"{row['overhead_ms_per_nfe']:+.3f} | {row['max_error']:.1e} |"
        )
    has_memory = any("peak_rss_mb" in row for row in result["train"])
    lines += [
        "",
        "| training step | NFE fwd/bwd | ms | ms/NFE |" + (" peak RSS MB |" if has_memory else ""),
        "|---|---:|---:|---:|" + ("---:|" if has_memory else ""),
    ]
    for row in result["train"]:
        memory = f" {row['peak_rss_mb']:.1f} |" if has_memory else ""
        lines.append(
            f"| {row['model']} | {row['nfe_forward']}/{row['nfe_backward']} | {row['ms']:.1f} | "
            f"{row['ms_per_nfe']:.3f} |" + memory
        )
    return "\n".join(lines)


def profile(dim: int, batch: int, repeats: int = 20) -> str:
    """cProfile of ``repeats`` no-grad log_prob calls, pyro-nf's and the reference's."""
    field = make_field(dim)
    x = make_data(dim, batch)
    table = models(field)
    out = io.StringIO()
    for name in LOG_PROB_MODELS:
        log_prob = table[name].log_prob
        with torch.no_grad():
            log_prob(x.clone())
        profiler = cProfile.Profile()
        with torch.no_grad():
            profiler.enable()
            for _ in range(repeats):
                log_prob(x.clone())
            profiler.disable()
        out.write(f"\n===== {name}: {repeats} x log_prob, D={dim}, batch {batch}\n")
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    return out.getvalue()


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-child":
        memory_child(argv[1], int(argv[2]), int(argv[3]))
        return []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timings, fastest kept")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile the log_prob calls")
    parser.add_argument("--output", type=Path, default=None, help="results as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.profile:
        print(profile(2, 64))
        return []
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    min_run_time = 0.01 if args.quick else args.min_run_time
    print(f"torch {torch.__version__}, 1 thread, rtol = atol = {TOLERANCE}, hidden {HIDDEN}")
    results = []
    for dim, batch in configs:
        rounds = 1 if args.quick else args.rounds
        result = measure(dim, batch, min_run_time, rounds, memory=not args.skip_memory)
        results.append(result)
        print(markdown(result), flush=True)
        if args.output is not None:
            args.output.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
