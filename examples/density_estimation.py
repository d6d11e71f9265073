"""Density estimation: every flow family fitted to the 2-D toy densities of pyro_nf.

Each family (``realnvp``, ``spline``, ``maf``, ``iaf``, ``cnf``) is fitted by maximum
likelihood to each toy density of :mod:`pyro_nf.datasets`, next to a full-covariance
Gaussian baseline (its maximum-likelihood fit, in closed form). Written:

- ``densities.png``: a grid with the data in the first column and each model's learned
  density beside it;
- a table of held-out log-likelihoods (nats per point, higher is better), printed and
  saved in ``results.json``.

``--data PATH`` fits the same families to a tabular data set instead, standardized
with the training statistics: a numeric ``.csv`` (read whole) or a ``.npy`` array of
shape ``(N, D)``, which is streamed from disk (memory-mapped, block by block, see
:class:`pyro_nf.infer.NpyBatches`) and never loaded whole. Its rows are split by
position: the first 80% train (their last eighth is the validation range of early
stopping), the last 20% test, so the file should be in random order.

``--cnf-objective flow_matching`` trains the ``cnf`` family by flow matching
(:func:`pyro_nf.infer.flow_matching_loss`) instead of maximum likelihood, at
:func:`pyro_nf.fit`'s defaults for it (50,000 cheap steps at lr 1e-2, cosine decay)
unless ``--epochs`` / ``--lr`` are given.

``--devices N`` (and ``--strategy``, e.g. ``ddp``) trains through PyTorch Lightning
(:class:`pyro_nf.lightning.FlowDensityModule`, ``pip install "pyro-nf[lightning]"``)
with Lightning's early stopping and best checkpoint instead of :func:`pyro_nf.fit`;
with ``ddp`` Lightning starts N processes that each train on their part of every
minibatch, and only the first reports.

Run::

    python examples/density_estimation.py
    python examples/density_estimation.py --densities two_moons checkerboard --families maf cnf
    python examples/density_estimation.py --data my_table.csv
    python examples/density_estimation.py --families cnf --cnf-objective flow_matching
    python examples/density_estimation.py --data big_table.npy --devices 4 --strategy ddp
    python examples/density_estimation.py --quick       # a smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    base_parser,
    build_flow,
    family_builder,
    format_table,
    output_directory,
    progress_enabled,
    write_json,
)

from pyro_nf import fit  # noqa: E402
from pyro_nf.datasets import TOY_DENSITIES, toy_density, train_test_split  # noqa: E402
from pyro_nf.flows import FLOW_BASES  # noqa: E402
from pyro_nf.infer import FIT_OBJECTIVES, ArrayDataset, NpyBatches  # noqa: E402
from pyro_nf.infer.training import FIT_DEFAULTS  # noqa: E402

FAMILIES = ("gaussian", "realnvp", "spline", "maf", "iaf", "cnf")
LIMIT = 4.0  # the toy densities lie within about [-4, 4]^2
#: The example's epochs and learning rate for maximum likelihood (when not given).
LIKELIHOOD_EPOCHS, LIKELIHOOD_LR = 100, 3e-3


class GaussianBaseline:
    """The maximum-likelihood multivariate normal of the training data (closed form).

    ``data`` is a tensor or an iterable of minibatches (one streamed pass of sums).
    """

    def __init__(self, data: Tensor | Iterable[Tensor]) -> None:
        batches = [data] if isinstance(data, Tensor) else data
        count, total, outer = 0, 0.0, 0.0
        for batch in batches:
            batch = batch.double()
            count += len(batch)
            total = total + batch.sum(0)
            outer = outer + batch.T @ batch
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        covariance = covariance + 1e-6 * torch.eye(len(mean), dtype=covariance.dtype)
        dtype = torch.get_default_dtype()
        self.distribution = torch.distributions.MultivariateNormal(
            mean.to(dtype), covariance.to(dtype)
        )

    def log_prob(self, x: Tensor) -> Tensor:
        return self.distribution.log_prob(x)


class Standardized:
    """Minibatches of a stream, standardized as ``(x - mean) / std`` (re-iterable)."""

    def __init__(self, batches: NpyBatches, mean: Tensor, std: Tensor) -> None:
        self.batches, self.mean, self.std = batches, mean, std

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return ((batch - self.mean) / self.std for batch in self.batches)


class StreamedTable:
    """A ``.npy`` table on disk, split by position into train, validation and test streams."""

    def __init__(self, path: str | Path, batch_size: int, seed: int) -> None:
        self.path = Path(path)
        self.batch_size, self.seed = batch_size, seed
        table = ArrayDataset(self.path)
        rows, self.dim = len(table), table.dim
        if rows < 10:
            raise ValueError(f"expected a table of at least 10 rows, got {rows} in {path}")
        test_start = rows - max(1, rows // 5)
        validation_start = test_start - max(1, test_start // 8)
        self.ranges = {
            "train": (0, validation_start),
            "validation": (validation_start, test_start),
            "test": (test_start, rows),
        }
        # Training statistics in one streamed pass (float64 sums: no loss over many rows).
        total = torch.zeros(self.dim, dtype=torch.float64)
        squares = torch.zeros(self.dim, dtype=torch.float64)
        for batch in self.stream("train", 1 << 16, raw=True):
            total += batch.double().sum(0)
            squares += batch.double().square().sum(0)
        count = validation_start
        self.mean = (total / count).to(torch.get_default_dtype())
        variance = (squares / count - (total / count).square()).clamp_min(1e-12)
        self.std = variance.sqrt().to(torch.get_default_dtype())

    def stream(self, split: str, batch_size: int | None = None, raw: bool = False) -> object:
        batches = NpyBatches(
            self.path,
            batch_size or self.batch_size,
            rows=self.ranges[split],
            shuffle=split == "train",
            seed=self.seed,
        )
        return batches if raw else Standardized(batches, self.mean, self.std)


def hidden_layers(family: str, args: argparse.Namespace) -> int:
    """The hidden layers of ``family``'s conditioners (or vector field): ``--hidden-layers``
    if given, else 2, and 3 for the cnf family trained by flow matching, whose field
    needs the depth: with three of 64 units ``fit`` takes the rings from 3.320 to 2.943
    and the two spirals from 2.930 to 2.777 (``docs/benchmarks/density.md``)."""
    if args.hidden_layers is not None:
        return args.hidden_layers
    return 3 if family == "cnf" and args.cnf_objective == "flow_matching" else 2


def training_options(family: str, args: argparse.Namespace) -> dict:
    """The objective, epochs and learning rate of ``family``'s fit.

    Maximum likelihood at the example's 100 epochs and lr 3e-3 unless given; the cnf
    family with ``--cnf-objective flow_matching`` at ``fit``'s defaults for flow
    matching (None) unless given.
    """
    objective = args.cnf_objective if family == "cnf" else "likelihood"
    if objective == "likelihood":
        epochs = LIKELIHOOD_EPOCHS if args.epochs is None else args.epochs
        lr = LIKELIHOOD_LR if args.lr is None else args.lr
        return {"objective": objective, "epochs": epochs, "lr": lr}
    return {"objective": objective, "epochs": args.epochs, "lr": args.lr}


def fit_with_lightning(
    flow: object, train: object, validation: object, args, options: dict
) -> bool:
    """Maximum likelihood (or flow matching) through Lightning; True on the process that
    reports. ``options``: :func:`training_options`."""
    import lightning.pytorch as pl

    from pyro_nf.lightning import FlowDensityModule

    monitor = {"monitor": "validation_log_likelihood", "mode": "max"}
    best = pl.callbacks.ModelCheckpoint(dirpath=args.checkpoint_dir, **monitor)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=options["epochs"] or LIKELIHOOD_EPOCHS,
        callbacks=[pl.callbacks.EarlyStopping(patience=args.patience or 10, **monitor), best],
        logger=False,
        enable_progress_bar=progress_enabled(args),
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    # Flow matching without --lr: fit's rate for it (Lightning has no decay unless the
    # user's optimizer brings one, and runs --epochs or the example's 100).
    lr = options["lr"] or FIT_DEFAULTS[options["objective"]].lr
    trainer.fit(FlowDensityModule(flow, lr=lr, objective=options["objective"]), train, validation)
    if best.best_model_path:  # the best epoch's parameters, as fit keeps them
        state = torch.load(best.best_model_path, weights_only=True)["state_dict"]
        flow.load_state_dict({k.removeprefix("flow."): v for k, v in state.items()})
    flow.cpu()
    return trainer.global_rank == 0


def tensor_loaders(train: Tensor, args) -> tuple[object, object]:
    """Shuffled training and validation loaders of a tensor (a 10% validation split)."""
    train_part, validation = train_test_split(train, test_fraction=0.1, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        train_part, batch_size=args.batch_size, shuffle=True, generator=generator
    )
    return loader, torch.utils.data.DataLoader(validation, batch_size=4096)


def make_model(
    family: str, train: Tensor | StreamedTable, args: argparse.Namespace
) -> tuple[object, bool]:
    """A fitted model of ``family`` on ``train``, and whether this process reports."""
    dim = train.dim if isinstance(train, StreamedTable) else train.shape[1]
    if family == "gaussian":
        return GaussianBaseline(train if isinstance(train, Tensor) else train.stream("train")), True
    hidden_dims = (args.hidden,) * hidden_layers(family, args)
    flow = build_flow(
        family, dim, num_layers=args.flow_layers, hidden_dims=hidden_dims, base=args.base
    )
    if isinstance(train, StreamedTable):
        data, validation = train.stream("train"), train.stream("validation", 4096)
    else:
        data, validation = train, None
    reports = True
    options = training_options(family, args)
    if args.devices is not None:
        if validation is None:
            data, validation = tensor_loaders(train, args)
        reports = fit_with_lightning(flow, data, validation, args, options)
    else:
        # Early stopping on the validation data (for a tensor, a 10% split of it).
        fit(
            flow,
            data,
            validation_data=validation,
            batch_size=args.batch_size,
            patience="auto" if args.patience is None else args.patience,
            **options,
            seed=args.seed,
            progress=progress_enabled(args),
        )
    flow.eval()
    return flow, reports


@torch.no_grad()
def mean_log_prob(model: object, data: Tensor | StreamedTable, batch: int = 4096) -> float:
    """The mean log-density of a tensor's rows or of a streamed table's test range."""
    chunks = data.stream("test", batch) if isinstance(data, StreamedTable) else data.split(batch)
    total, count = 0.0, 0
    for chunk in chunks:
        total += float(model.log_prob(chunk).sum())
        count += len(chunk)
    return total / count


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
    parser.add_argument(
        "--data", default=None, help="a .csv table, or a .npy table streamed from disk"
    )
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs (default: 100; flow matching: fit's)"
    )
    parser.add_argument(
        "--patience", type=int, default=None, help="early-stopping patience (default: fit's)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 3e-3; flow matching: fit's)"
    )
    parser.add_argument(
        "--cnf-objective",
        choices=FIT_OBJECTIVES,
        default="likelihood",
        help="train the cnf family by maximum likelihood or by flow matching",
    )
    parser.add_argument("--flow-layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--hidden-layers",
        type=int,
        default=None,
        help="hidden layers per conditioner (default 2; 3 for cnf by flow matching)",
    )
    parser.add_argument(
        "--base",
        choices=FLOW_BASES,
        default="normal",
        help="the flows' base distribution (student_t: learned tails, for heavy-tailed data)",
    )
    parser.add_argument("--resolution", type=int, default=120, help="density image pixels")
    parser.add_argument(
        "--devices", type=int, default=None, help="train through Lightning on this many devices"
    )
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="Lightning checkpoints (default: the output dir)"
    )
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
    families = [f for f in args.families if f != "gaussian"]
    for family in families:
        family_builder(family)  # an unknown name fails here, before any data is read
    if "gaussian" in args.families:
        families.insert(0, "gaussian")

    if args.devices is not None and args.checkpoint_dir is None:
        args.checkpoint_dir = str(directory / "checkpoints")
    if args.data and Path(args.data).suffix == ".npy":
        datasets = {
            Path(args.data).stem: (StreamedTable(args.data, args.batch_size, args.seed),) * 2
        }
    elif args.data:
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

    rows, images, seconds, reporter = [], {}, {}, True
    tasks = [(name, family) for name in datasets for family in families]
    bar = tqdm(tasks, desc="fits", disable=not progress_enabled(args))
    for name, family in bar:
        bar.set_postfix(density=name, family=family)
        train, test = datasets[name]
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model, reports = make_model(family, train, args)
        if not reports:
            reporter = False  # another process of this data-parallel run reports
            continue
        seconds[family] = seconds.get(family, 0.0) + time.perf_counter() - start
        if not rows or rows[-1]["density"] != name:
            rows.append({"density": name})
        rows[-1][family] = mean_log_prob(model, test)
        if isinstance(train, Tensor) and train.shape[1] == 2:
            images[name, family] = density_image(model, args.resolution)
    if not reporter:
        return {"rows": [], "files": [], "all_finite": True, "output_dir": str(directory)}

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
    results = {"rows": rows, "seconds": seconds, "args": vars(args)}
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
