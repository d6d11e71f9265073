"""Shared helpers of the benchmark scripts: side-by-side timing and a ratio table.

Every benchmark times pyro_nf and its Pyro counterpart in the same run, interleaved
by ``torch.utils.benchmark``, and prints medians and the ratio pyro_nf / reference
(below 1 means pyro_nf is faster). Speed is never asserted in tests.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark


@dataclass
class Row:
    """One comparison: the same operation in pyro_nf and in the reference library."""

    label: str
    ours: Callable[[], object]
    reference: Callable[[], object]
    reference_name: str = "pyro"


def median_seconds(fn: Callable[[], object], min_run_time: float) -> float:
    fn()  # warm-up (and lazy initialization) outside the timed region
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def fastest_call(fn: Callable[[], object], min_run_time: float) -> float:
    """The fastest of repeated single calls of ``fn`` over about ``min_run_time`` seconds.

    On a shared machine, load from other processes only ever adds time to a call, so
    the fastest call is the best estimate of what the call itself costs.
    """
    best = float("inf")
    deadline = time.perf_counter() + min_run_time
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        best = min(best, end - start)
        if end >= deadline:
            return best


def time_alternating(
    columns: dict[str, Callable[[], object]], rounds: int, min_run_time: float
) -> dict[str, list[float]]:
    """The fastest call (seconds) of every column in each of ``rounds`` rounds.

    Each round times every column in turn (:func:`fastest_call`), so load that comes
    and goes lands on all columns alike; the spread of a ratio over the rounds shows
    how much it moved. Every column is called once before the first round.
    """
    for fn in columns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in columns}
    for _ in range(rounds):
        for name, fn in columns.items():
            times[name].append(fastest_call(fn, min_run_time))
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a device synchronization, so a timing covers the whole call."""

    def run() -> object:
        out = fn()
        synchronize(device)
        return out

    return run


def run_rows(
    rows: list[Row], min_run_time: float = 1.0, device: str = "cpu", rounds: int = 1
) -> list[dict]:
    """Time every row (ours and reference alternately) and print a table of medians.

    With ``rounds > 1`` each side is timed that many times, alternating, and the
    smallest median is kept: on a shared machine, load from other processes only ever
    adds time. A row whose single calls are long (over ``5 * min_run_time``) averages
    such load out by itself and is timed once.
    """
    results = []
    header = f"{'operation':<46} {'pyro_nf (ms)':>13} {'reference (ms)':>15} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ours = median_seconds(row.ours, min_run_time)
        reference = median_seconds(row.reference, min_run_time)
        for _ in range(rounds - 1):
            if min(ours, reference) > 5 * min_run_time:
                break
            ours = min(ours, median_seconds(row.ours, min_run_time))
            reference = min(reference, median_seconds(row.reference, min_run_time))
        ratio = ours / reference
        results.append(
            {
                "label": row.label,
                "ours_ms": 1e3 * ours,
                "reference_ms": 1e3 * reference,
                "ratio": ratio,
            }
        )
        print(
            f"{row.label:<46} {1e3 * ours:>13.2f} {1e3 * reference:>15.2f} {ratio:>7.2f}",
            flush=True,
        )
    return results


def common_arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, default=4096, help="batch size")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate timings per row, keep the fastest"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser


def steady_allocator() -> bool:
    """Keep freed memory in the process, so no timed call pays for fresh pages.

    glibc serves allocations above a moving threshold (128 KiB at first) with ``mmap``
    and hands them back on ``free``: the next call of the same size then touches
    new pages, and a page fault per 4 KiB cost a 4096 x 256 float32 activation about a
    millisecond, more than the matmul that fills it, in some columns and not others,
    depending on each library's allocation history. With the thresholds raised, every
    column reuses its memory as it would in a training loop. Returns whether it applied
    (glibc only).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(
            libc.mallopt(m_mmap_threshold, 1 << 25)
        )
    except (OSError, AttributeError):
        return False


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line, apply ``--threads`` and keep the allocator steady."""
    args = parser.parse_args()
    steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
