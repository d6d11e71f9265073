"""Density estimation: every flow family fitted to the 2-D toy densities of pyro_nf.

Each family (``realnvp``, ``spline``, ``maf``, ``iaf``, ``cnf``) is fitted by maximum
likelihood to each toy density of :mod:`pyro_nf.datasets`, next to a full-covariance
Gaussian baseline (its maximum-likelihood fit, in closed form). Written:

- ``densities.png``: a grid with the data in the first column and each model's learned
  density beside it;
- a table of held-out log-likelihoods (nats per point, higher is better), printed and
  saved in ``results.json``.

``--data PATH`` fits the same families to a tabular data set instead (a ``.npy`` array
or a numeric ``.csv``, one row per point), standardized with the training statistics.

Run::

    python examples/density_estimation.py
    python examples/density_estimation.py --densities two_moons checkerboard --families maf cnf
    python examples/density_estimation.py --data my_table.csv
    python examples/density_estimation.py --quick       # a smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    available_families,
    base_parser,
    build_flow,
    format_table,
    output_directory,
    progress_enabled,
    write_json,
)

from pyro_nf import fit  # noqa: E402
from pyro_nf.datasets import TOY_DENSITIES, toy_density, train_test_split  # noqa: E402

FAMILIES = ("gaussian", "realnvp", "spline", "maf", "iaf", "cnf")
LIMIT = 4.0  # the toy densities lie within about [-4, 4]^2


class GaussianBaseline:
    """The maximum-likelihood multivariate normal of the training data (closed form)."""

    def __init__(self, data: Tensor) -> None:
        mean = data.mean(0)
        centred = data - mean
        covariance = centred.T @ centred / len(data)
        covariance = covariance + 1e-6 * torch.eye(data.shape[1], dtype=data.dtype)
        self.distribution = torch.distributions.MultivariateNormal(mean, covariance)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.distribution.log_prob(x)


def make_model(family: str, train: Tensor, args: argparse.Namespace) -> object:
    """A fitted model of ``family`` (``gaussian`` or a flow family) on ``train``."""
    if family == "gaussian":
        return GaussianBaseline(train)
    flow = build_flow(
        family, train.shape[1], num_layers=args.flow_layers, hidden_dims=(args.hidden,) * 2
    )
    # Maximum likelihood with early stopping on a 10% validation split of the training data.
    fit(
        flow,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        progress=progress_enabled(args),
    )
    flow.eval()
    return flow


@torch.no_grad()
def mean_log_prob(model: object, data: Tensor, batch: int = 4096) -> float:
    values = [model.log_prob(data[i : i + batch]) for i in range(0, len(data), batch)]
    return torch.cat(values).mean().item()


@torch.no_grad()
def density_image(model: object, resolution: int) -> np.ndarray:
    """``p(x)`` on a ``resolution`` x ``resolution`` grid over [-LIMIT, LIMIT]^2."""
    axis = torch.linspace(-LIMIT, LIMIT, resolution)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
    log_p = torch.cat([model.log_prob(chunk) for chunk in grid.split(4096)])
    return log_p.exp().reshape(resolution, resolution).nan_to_num(0.0).numpy()


def plot_grid(
    data: dict[str, Tensor],
    images: dict[tuple[str, str], np.ndarray],
    families: list[str],
    path: Path,
) -> None:
    names = list(data)
    columns = ["data", *families]
    figure, axes = plt.subplots(
        len(names), len(columns), figsize=(1.6 * len(columns), 1.6 * len(names)), squeeze=False
    )
    extent = (-LIMIT, LIMIT, -LIMIT, LIMIT)
    for i, name in enumerate(names):
        points = data[name].numpy()
        axes[i, 0].hist2d(
            points[:, 0], points[:, 1], bins=80, range=[[-LIMIT, LIMIT]] * 2, cmap="magma"
        )
        for j, family in enumerate(families, start=1):
            image = images[name, family]
            # A robust colour scale: one sharp spike must not turn the rest of the panel black.
            vmax = float(np.quantile(image, 0.995))
            axes[i, j].imshow(image, origin="lower", extent=extent, cmap="magma", vmax=vmax)
        axes[i, 0].set_ylabel(name, fontsize=8)
    for j, column in enumerate(columns):
        axes[0, j].set_title(column, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def load_table(path: str | Path) -> Tensor:
    """A ``(N, D)`` float tensor from a ``.npy`` file or a numeric ``.csv`` (header allowed)."""
    path = Path(path)
    if path.suffix == ".npy":
        array = np.load(path)
    elif path.suffix == ".csv":
        try:
            array = np.loadtxt(path, delimiter=",", ndmin=2)
        except ValueError:
            array = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)
    else:
        raise ValueError(f"expected a .npy or .csv file, got {path}")
    if array.ndim != 2 or len(array) < 10 or not np.isfinite(array).all():
        raise ValueError(
            f"expected a finite table of shape (N >= 10, D), got shape {array.shape} from {path}"
        )
    return torch.as_tensor(array, dtype=torch.get_default_dtype())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--densities", nargs="+", choices=sorted(TOY_DENSITIES), default=None)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--data", default=None, help="a .npy or .csv table instead of the toys")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=10, help="early-stopping patience")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--flow-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=120, help="density image pixels")
    args = parser.parse_args(argv)
    if args.densities is None:
        args.densities = ["two_moons", "checkerboard"] if args.quick else sorted(TOY_DENSITIES)
    if args.quick:
        args.num_train, args.num_test, args.epochs = 256, 128, 2
        args.flow_layers, args.hidden, args.resolution = 2, 16, 24
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the table rows and the paths it wrote."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    directory = output_directory(args.output_dir, "density_estimation")
    families, missing = available_families([f for f in args.families if f != "gaussian"])
    for family in missing:
        print(f"[density] flow family {family!r} is not available in this pyro_nf: skipped")
    if "gaussian" in args.families:
        families.insert(0, "gaussian")

    if args.data:
        table = load_table(args.data)
        train, test = train_test_split(table, test_fraction=0.2, seed=args.seed)
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
        datasets = {Path(args.data).stem: ((train - mean) / std, (test - mean) / std)}
    else:
        datasets = {
            name: (
                toy_density(name, args.num_train, seed=args.seed),
                toy_density(name, args.num_test, seed=args.seed + 1),
            )
            for name in args.densities
        }

    rows, images, seconds = [], {}, {}
    tasks = [(name, family) for name in datasets for family in families]
    bar = tqdm(tasks, desc="fits", disable=not progress_enabled(args))
    for name, family in bar:
        bar.set_postfix(density=name, family=family)
        train, test = datasets[name]
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model = make_model(family, train, args)
        seconds[family] = seconds.get(family, 0.0) + time.perf_counter() - start
        if not rows or rows[-1]["density"] != name:
            rows.append({"density": name})
        rows[-1][family] = mean_log_prob(model, test)
        if train.shape[1] == 2:
            images[name, family] = density_image(model, args.resolution)

    print("\n[density] held-out log-likelihood (nats per point, higher is better):")
    print(format_table(rows, ["density", *families]))
    print(
        "[density] training seconds per family: "
        + ", ".join(f"{f} {s:.1f}" for f, s in seconds.items())
    )
    files = []
    if images:
        path = directory / "densities.png"
        plot_grid({n: d[0] for n, d in datasets.items()}, images, families, path)
        files.append(path)
    results = {"rows": rows, "seconds": seconds, "unavailable": missing, "args": vars(args)}
    write_json(directory / "results.json", results)
    finite = all(math.isfinite(v) for row in rows for k, v in row.items() if k != "density")
    return {
        **results,
        "files": [str(f) for f in files],
        "all_finite": finite,
        "output_dir": str(directory),
    }


if __name__ == "__main__":
    main()
