"""Peak memory of fit on data streamed from disk against the data's size.

Writes a memory-mapped ``.npy`` array of each requested row count (1M and 10M rows by
default, 8 float32 columns: 32 MB and 320 MB) into a temporary folder, chunk by
chunk, then trains a small real NVP flow for one pass over it with
:func:`pyro_nf.fit`, each run in a fresh process whose peak resident memory
(``VmHWM``) is read at the end, side by side:

- ``stream``: :class:`pyro_nf.infer.NpyBatches` reads blocks of rows from the file
  (the last 1% of the rows are the validation range, streamed the same way);
- ``in memory``: the same file loaded whole into a tensor (the peer: what ``fit`` on a
  tensor needs).

Reported per run: the array's size on disk, the peak resident memory, and the peak
above the process's resident memory just before ``fit`` (imports and the flow), which
is what the data cost. Streaming should stay flat as rows grow; in memory grows with
the array.

Run::

    python benchmarks/streaming.py                   # 1M and 10M rows
    python benchmarks/streaming.py --rows 100000 --modes stream   # quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def resident_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_array(path: Path, rows: int, dim: int, chunk: int = 1 << 20) -> None:
    """A correlated Gaussian table of shape (rows, dim), written chunk by chunk."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    generator = np.random.default_rng(0)
    mixing = generator.normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        array[start:stop] = generator.standard_normal((stop - start, dim), np.float32) @ mixing
    array.flush()
    del array


def child(path: str, mode: str, batch_size: int, threads: int) -> dict:
    """One fit in this process; returns its memory and time figures."""
    import torch

    import pyro_nf
    from pyro_nf.infer import NpyBatches

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows, dim = np.load(path, mmap_mode="r").shape
    flow = pyro_nf.realnvp(dim, num_layers=2, hidden_dims=(32,))
    before = resident_mb("VmRSS")
    start = time.perf_counter()
    validation_start = rows - max(1, rows // 100)
    options = {"epochs": 1, "batch_size": batch_size, "lr": 1e-3, "progress": False}
    if mode == "stream":
        train = NpyBatches(path, batch_size, rows=(0, validation_start), seed=0)
        validation = NpyBatches(path, batch_size, rows=(validation_start, rows), shuffle=False)
        history = pyro_nf.fit(flow, train, validation_data=validation, **options)
    else:
        data = torch.from_numpy(np.load(path))
        train, validation = data[:validation_start], data[validation_start:]
        history = pyro_nf.fit(flow, train, validation_data=validation, **options)
    seconds = time.perf_counter() - start
    return {
        "mode": mode,
        "rows": rows,
        "array MB": rows * dim * 4 / 2**20,
        "peak RSS MB": resident_mb("VmHWM"),
        "peak above start MB": resident_mb("VmHWM") - before,
        "seconds": seconds,
        "validation ll": history.validation_log_likelihood[-1],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=65536)
    parser.add_argument("--modes", nargs="+", choices=("stream", "memory"), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="folder for the arrays (a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.mode, args.batch_size, args.threads)))
        return []
    modes = args.modes or ["stream", "memory"]
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for rows in args.rows:
            path = Path(folder) / f"rows-{rows}.npy"
            write_array(path, rows, args.dim)
            for mode in modes:
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    str(path),
                    "--mode",
                    mode,
                    "--batch-size",
                    str(args.batch_size),
                    "--threads",
                    str(args.threads),
                ]
                output = subprocess.run(command, capture_output=True, text=True, check=True)
                results.append(json.loads(output.stdout.strip().splitlines()[-1]))
                row = results[-1]
                print(
                    f"{row['mode']:>7}  rows {row['rows']:>11,}  array {row['array MB']:8.1f} MB"
                    f"  peak RSS {row['peak RSS MB']:8.1f} MB  above start "
                    f"{row['peak above start MB']:8.1f} MB  {row['seconds']:6.1f} s  "
                    f"validation ll {row['validation ll']:.3f}",
                    flush=True,
                )
            path.unlink()
    return results


if __name__ == "__main__":
    main()
