"""A variational autoencoder trained with Pyro SVI, with flow posteriors and flow priors.

The encoder maps an image ``x`` to a location ``mu``, a scale ``sigma`` and a context
vector ``h``. The approximate posterior is the standard amortized flow construction:

    z0 ~ N(mu(x), diag sigma(x)^2),    z = T_h(z0),    T a conditional flow,

so ``log q(z | x) = log N(z0; mu, sigma) - log|det dz/dz0|``. ``diag`` is the Gaussian
baseline without a flow. The prior is ``N(0, I)`` or an unconditional flow over ``z``.
The decoder gives Bernoulli pixel probabilities.

Default data: scikit-learn's 8x8 digits, binarized (:func:`pyro_nf.datasets.load_digits`).
``--data mnist --data-dir PATH`` reads MNIST from a local torchvision-format copy (the
raw IDX files, optionally gzipped); nothing is ever downloaded. ``--data PATH.npy``
streams images from a ``.npy`` array of shape ``(N, pixels)`` with values in [0, 1]
(square images), block by block from disk (:class:`pyro_nf.infer.NpyBatches`): the
last ``min(1000, N // 10)`` rows are the test set, the rest is never loaded whole.

``--devices N`` (and ``--strategy``, e.g. ``ddp``) trains through PyTorch Lightning
(:class:`pyro_nf.lightning.SVIModule` with Adam, ``pip install "pyro-nf[lightning]"``)
instead of Pyro's SVI loop with ClippedAdam; with ``ddp`` each of the N processes
trains on its part of every minibatch and only the first reports.

Reported per posterior: the test ELBO, an importance-weighted estimate of the test
log-likelihood with K samples (K = 1000 by default), and a check that a saved and
reloaded checkpoint gives the same test ELBO. Figures: reconstructions and samples.

Run::

    python examples/vae.py --posterior diag iaf maf realnvp cnf
    python examples/vae.py --prior realnvp --posterior iaf
    python examples/vae.py --data images.npy --devices 2 --strategy ddp
    python examples/vae.py --quick            # a smoke test
"""

from __future__ import annotations

import argparse
import gzip
import math
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import Tensor, nn
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

from pyro_nf.datasets import load_digits  # noqa: E402
from pyro_nf.infer import ArrayDataset, NpyBatches  # noqa: E402

POSTERIORS = ("diag", "iaf", "maf", "realnvp", "spline", "cnf")
PRIORS = ("normal", "realnvp", "maf")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

_MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def read_idx_images(path: Path) -> Tensor:
    """Read an IDX image file (``magic 2051``, optionally gzipped) as uint8 ``(N, H, W)``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 16:
        raise ValueError(f"{path} is too short to be an IDX image file ({len(data)} bytes)")
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 2051:
        raise ValueError(f"{path}: expected IDX image magic number 2051, got {magic}")
    expected = 16 + count * rows * cols
    if len(data) != expected:
        raise ValueError(f"{path}: expected {expected} bytes for {count} images, got {len(data)}")
    pixels = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8)
    return pixels.reshape(count, rows, cols)


def _find_mnist_file(data_dir: Path, name: str) -> Path:
    candidates = [
        folder / (name + suffix)
        for folder in (data_dir, data_dir / "raw", data_dir / "MNIST" / "raw")
        for suffix in ("", ".gz")
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MNIST file {name}[.gz] not found under {data_dir} (looked in ., raw/ and MNIST/raw/); "
        "this example never downloads data: point --data-dir at a torchvision-format copy"
    )


def load_mnist(data_dir: str | Path, binarize: bool = True) -> tuple[Tensor, Tensor]:
    """MNIST train and test images from a local torchvision-format copy, as ``(N, 784)``.

    Pixels are scaled to [0, 1] and, with ``binarize``, thresholded at 0.5.
    """
    data_dir = Path(data_dir)
    splits = []
    for split in ("train", "test"):
        images = read_idx_images(_find_mnist_file(data_dir, _MNIST_FILES[split]))
        images = images.reshape(images.shape[0], -1).to(torch.get_default_dtype()) / 255.0
        splits.append((images >= 0.5).to(images.dtype) if binarize else images)
    return splits[0], splits[1]


def load_npy_images(args) -> tuple[NpyBatches, Tensor, tuple[int, int]]:
    """A streamed training range of a ``.npy`` image table and its test rows in memory."""
    table = ArrayDataset(args.data)
    rows, pixels = len(table), table.dim
    side = math.isqrt(pixels)
    if side * side != pixels or rows < 2:
        raise ValueError(
            f"expected a .npy table of square images (N >= 2, pixels = side^2), got "
            f"({rows}, {pixels}) from {args.data}"
        )
    test_start = rows - max(1, min(1000, rows // 10))
    train_stop = min(test_start, args.max_train) if args.max_train else test_start
    test = table[slice(test_start, rows)].to(torch.get_default_dtype())
    if args.max_test:
        test = test[: args.max_test]
    train = NpyBatches(args.data, args.batch_size, rows=(0, train_stop), seed=args.seed)
    return train, test, (side, side)


def load_data(args) -> tuple[Tensor | NpyBatches, Tensor, tuple[int, int]]:
    """``(train, test, image_shape)`` for the chosen data set, subsampled in quick mode.

    ``train`` is a tensor, or for a ``.npy`` file a stream of minibatches.
    """
    if args.data.endswith(".npy"):
        return load_npy_images(args)
    if args.data == "digits":
        train, test = load_digits(binarize=True, seed=args.seed)
        shape = (8, 8)
    elif args.data == "mnist":
        if args.data_dir is None:
            raise ValueError("--data mnist needs --data-dir PATH (a local torchvision copy)")
        train, test = load_mnist(args.data_dir)
        shape = (28, 28)
    else:
        raise ValueError(f"--data must be digits, mnist or a .npy file, got {args.data!r}")
    if args.max_train:  # both splits are already shuffled
        train = train[: args.max_train]
    if args.max_test:
        test = test[: args.max_test]
    return train, test, shape


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """Everything needed to rebuild a :class:`VAE` from a checkpoint."""

    data_dim: int
    latent_dim: int = 8
    hidden_dim: int = 128
    posterior: str = "diag"
    prior: str = "normal"
    context_dim: int = 32
    flow_layers: int = 4
    flow_hidden: int = 64


class VAE(nn.Module):
    """Bernoulli VAE whose posterior and prior are Gaussian or normalizing flows."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        hidden, latent = config.hidden_dim, config.latent_dim
        self.encoder = nn.Sequential(
            nn.Linear(config.data_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU()
        )
        self.encoder_loc = nn.Linear(hidden, latent)
        self.encoder_scale = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden),
            nn.ELU(),
            nn.Linear(hidden, hidden),
            nn.ELU(),
            nn.Linear(hidden, config.data_dim),
        )
        flow_hidden = (config.flow_hidden, config.flow_hidden)
        if config.posterior == "diag":
            self.encoder_context = None
            self.posterior_flow = None
        else:
            self.encoder_context = nn.Linear(hidden, config.context_dim)
            self.posterior_flow = build_flow(
                config.posterior,
                latent,
                context_dim=config.context_dim,
                num_layers=config.flow_layers,
                hidden_dims=flow_hidden,
            )
        self.prior_flow = (
            None
            if config.prior == "normal"
            else build_flow(
                config.prior, latent, num_layers=config.flow_layers, hidden_dims=flow_hidden
            )
        )

    def prior(self, like: Tensor) -> dist.Distribution:
        """``p(z)``: ``N(0, I)`` or the prior flow, on ``like``'s device and dtype."""
        if self.prior_flow is not None:
            return self.prior_flow()
        zeros = like.new_zeros(self.config.latent_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def posterior(self, x: Tensor) -> dist.Distribution:
        """``q(z | x)`` with batch shape ``x.shape[:-1]``: a conditional flow on N(mu, sigma)."""
        hidden = self.encoder(x)
        loc = self.encoder_loc(hidden)
        scale = nn.functional.softplus(self.encoder_scale(hidden)) + 1e-4
        base = dist.Normal(loc, scale).to_event(1)
        if self.posterior_flow is None:
            return base
        transforms = self.posterior_flow(self.encoder_context(hidden)).transforms
        return dist.TransformedDistribution(base, transforms)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits of the pixels, shape ``z.shape[:-1] + (data_dim,)``."""
        return self.decoder(z)

    def model(self, x: Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", dist.Bernoulli(logits=self.decode(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x))


def save_checkpoint(vae: VAE, path: Path) -> None:
    torch.save({"config": asdict(vae.config), "state_dict": vae.state_dict()}, path)


def load_checkpoint(path: Path) -> VAE:
    checkpoint = torch.load(path, weights_only=True)
    vae = VAE(VAEConfig(**checkpoint["config"]))
    vae.load_state_dict(checkpoint["state_dict"])
    return vae


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def _log_prob_per_datum(trace: poutine.Trace) -> Tensor:
    trace.compute_log_prob()
    sites = [s for s in trace.nodes.values() if s["type"] == "sample"]
    return sum(site["log_prob"] for site in sites)


@torch.no_grad()
def log_importance_weights(
    vae: VAE, x: Tensor, num_samples: int, max_rows: int = 40_000, show_progress: bool = False
) -> Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``z_k ~ q(z | x)``, shape ``(num_samples, N)``.

    Computed from Pyro traces of the guide and of the model replayed on them, with the
    data repeated ``k`` times per chunk so that no distribution needs an extra batch dim.
    """
    vae.eval()
    n = x.shape[0]
    per_chunk = max(1, min(num_samples, max_rows // n))
    chunks = []
    starts = range(0, num_samples, per_chunk)
    for start in tqdm(starts, desc="importance samples", leave=False, disable=not show_progress):
        k = min(per_chunk, num_samples - start)
        repeated = x.expand(k, *x.shape).reshape(k * n, -1)
        guide_trace = poutine.trace(vae.guide).get_trace(repeated)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(
            repeated
        )
        log_weight = _log_prob_per_datum(model_trace) - _log_prob_per_datum(guide_trace)
        chunks.append(log_weight.reshape(k, n))
    return torch.cat(chunks)


def evaluate(vae: VAE, x: Tensor, num_samples: int, seed: int, show_progress: bool = False) -> dict:
    """Test ELBO (mean log-weight) and the importance-weighted log-likelihood, per datum.

    With K samples the second is ``mean_n log (1/K) sum_k exp(log_w[k, n])``, a lower
    bound of ``log p(x)`` that tightens as K grows (the IWAE bound).
    """
    pyro.set_rng_seed(seed)
    log_w = log_importance_weights(vae, x, num_samples, show_progress=show_progress)
    elbo = log_w.mean().item()
    log_likelihood = (torch.logsumexp(log_w, 0) - math.log(num_samples)).mean().item()
    return {"elbo": elbo, "log_likelihood": log_likelihood}


# --------------------------------------------------------------------------------------
# Training and figures
# --------------------------------------------------------------------------------------


def minibatches(
    data: Tensor | NpyBatches, batch_size: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """One epoch of shuffled minibatches of a tensor, or one pass of a stream."""
    if isinstance(data, NpyBatches):
        yield from data
        return
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(data), batch_size):
        yield data[order[start : start + batch_size]]


def train(vae: VAE, data: Tensor | NpyBatches, args, label: str) -> list[float]:
    """SVI with ``Trace_ELBO``; returns the mean negative ELBO per datum of each epoch."""
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, ClippedAdam({"lr": args.lr, "clip_norm": 10.0}), Trace_ELBO())
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    bar = tqdm(range(args.epochs), desc=f"train {label}", disable=not progress_enabled(args))
    for _ in bar:
        vae.train()
        total, count = 0.0, 0
        for batch in minibatches(data, args.batch_size, generator):
            total += svi.step(batch)
            count += len(batch)
        losses.append(total / count)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(
                f"{label}: the ELBO became {losses[-1]} in epoch {len(losses)}"
            )
        bar.set_postfix(neg_elbo=f"{losses[-1]:.2f}")
    return losses


def train_with_lightning(vae: VAE, data: Tensor | NpyBatches, args) -> list[float] | None:
    """SVI through Lightning's Trainer; the final training -ELBO per datum, or None off rank 0."""
    import lightning.pytorch as pl

    from pyro_nf.lightning import SVIModule

    pyro.clear_param_store()
    if isinstance(data, Tensor):
        generator = torch.Generator().manual_seed(args.seed)
        data = torch.utils.data.DataLoader(
            data, batch_size=args.batch_size, shuffle=True, generator=generator
        )

    class EpochLoss(pl.Callback):
        """The mean -ELBO per image of each epoch (of this process's minibatches)."""

        def __init__(self) -> None:
            self.losses, self.total, self.count = [], 0.0, 0

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.total, self.count = self.total + float(loss), self.count + len(batch)

        def on_train_epoch_end(self, trainer, module) -> None:
            self.losses.append(self.total / max(self.count, 1))
            self.total, self.count = 0.0, 0

    epoch_loss = EpochLoss()
    module = SVIModule(vae.model, vae.guide, Trace_ELBO(), lr=args.lr)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_enabled(args),
        enable_model_summary=False,
        callbacks=[epoch_loss],
    )
    trainer.fit(module, data)
    vae.cpu()
    if trainer.global_rank != 0:
        return None
    if module.non_finite is not None:
        raise FloatingPointError(module.non_finite)
    return epoch_loss.losses


def _image_grid(images: Tensor, shape: tuple[int, int], rows: int, path: Path, title: str) -> None:
    cols = math.ceil(len(images) / rows)
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4))
    for ax, image in zip(axes.flat, images, strict=False):
        ax.imshow(image.reshape(shape).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
    for ax in axes.flat:
        ax.axis("off")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


@torch.no_grad()
def save_figures(
    vae: VAE, test: Tensor, shape: tuple[int, int], directory: Path, label: str
) -> list[Path]:
    """Reconstructions (originals above, mean p(x|z) for z ~ q(z|x) below) and samples."""
    vae.eval()
    originals = test[:10]
    reconstructions = torch.sigmoid(vae.decode(vae.posterior(originals).sample()))
    recon_path = directory / f"reconstructions_{label}.png"
    _image_grid(
        torch.cat([originals, reconstructions]),
        shape,
        2,
        recon_path,
        f"{label}: data / reconstruction",
    )
    z = vae.prior(test).sample((40,))
    sample_path = directory / f"samples_{label}.png"
    _image_grid(
        torch.sigmoid(vae.decode(z)), shape, 4, sample_path, f"{label}: samples (pixel means)"
    )
    return [recon_path, sample_path]


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--data", default="digits", help="digits, mnist (with --data-dir) or a .npy file"
    )
    parser.add_argument("--data-dir", default=None, help="local torchvision-format MNIST folder")
    parser.add_argument("--posterior", nargs="+", choices=POSTERIORS, default=["iaf"])
    parser.add_argument("--prior", choices=PRIORS, default="normal")
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--context-dim", type=int, default=32)
    parser.add_argument("--flow-layers", type=int, default=4)
    parser.add_argument("--flow-hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-importance", type=int, default=1000, help="K of the test log p(x)")
    parser.add_argument("--elbo-samples", type=int, default=10, help="samples of the test ELBO")
    parser.add_argument("--max-train", type=int, default=0, help="use at most this many images")
    parser.add_argument("--max-test", type=int, default=0, help="use at most this many images")
    parser.add_argument(
        "--devices", type=int, default=None, help="train through Lightning on this many devices"
    )
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = min(args.epochs, 2)
        args.max_train = args.max_train or 128
        args.max_test = args.max_test or 32
        args.num_importance = min(args.num_importance, 8)
        args.elbo_samples = min(args.elbo_samples, 2)
        args.latent_dim, args.hidden_dim, args.context_dim = 4, 32, 8
        args.flow_layers, args.flow_hidden = 2, 16
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the table rows and the paths it wrote."""
    args = parse_args(argv)
    directory = output_directory(args.output_dir, "vae")
    show = progress_enabled(args)
    needed = [p for p in args.posterior if p != "diag"] + (
        [args.prior] if args.prior != "normal" else []
    )
    for family in needed:
        family_builder(family)  # an unknown name fails here, before any data is read
    posteriors = list(args.posterior)

    train_data, test_data, shape = load_data(args)
    num_train = train_data.stop if isinstance(train_data, NpyBatches) else len(train_data)
    print(f"[vae] data {args.data}: {num_train} train, {len(test_data)} test images")
    rows, files = [], []
    for posterior in posteriors:
        torch.manual_seed(args.seed)
        pyro.set_rng_seed(args.seed)
        config = VAEConfig(
            data_dim=test_data.shape[1],
            latent_dim=args.latent_dim,
            hidden_dim=args.hidden_dim,
            posterior=posterior,
            prior=args.prior,
            context_dim=args.context_dim,
            flow_layers=args.flow_layers,
            flow_hidden=args.flow_hidden,
        )
        vae = VAE(config)
        label = f"{posterior}-{args.prior}"
        start = time.perf_counter()
        if args.devices is None:
            losses = train(vae, train_data, args, label)
        else:
            losses = train_with_lightning(vae, train_data, args)
            if losses is None:
                continue  # another process of this data-parallel run reports
        seconds = time.perf_counter() - start

        elbo = evaluate(vae, test_data, args.elbo_samples, args.seed)["elbo"]
        log_likelihood = evaluate(vae, test_data, args.num_importance, args.seed, show)[
            "log_likelihood"
        ]
        checkpoint = directory / f"vae_{label}.pt"
        save_checkpoint(vae, checkpoint)
        pyro.clear_param_store()  # the reloaded module must not pick up stored parameters
        reloaded_elbo = evaluate(
            load_checkpoint(checkpoint), test_data, args.elbo_samples, args.seed
        )["elbo"]
        if not math.isclose(reloaded_elbo, elbo, rel_tol=1e-5, abs_tol=1e-4):
            raise RuntimeError(
                f"{label}: the reloaded checkpoint gives test ELBO {reloaded_elbo}, expected {elbo}"
            )
        files += save_figures(vae, test_data, shape, directory, label)
        files.append(checkpoint)
        rows.append(
            {
                "posterior": posterior,
                "prior": args.prior,
                "parameters": sum(p.numel() for p in vae.parameters()),
                "train seconds": seconds,
                "train -ELBO": losses[-1],
                "test ELBO": elbo,
                f"test log p(x) K={args.num_importance}": log_likelihood,
                "reload ELBO": reloaded_elbo,
            }
        )
        print(
            f"[vae] {label}: test ELBO {elbo:.2f}, test log p(x) {log_likelihood:.2f} "
            f"(K={args.num_importance}), reloaded checkpoint ELBO {reloaded_elbo:.2f}"
        )

    columns = list(rows[0]) if rows else []
    if rows:
        print(f"\n[vae] test set ({len(test_data)} images), nats per image:")
        print(format_table(rows, columns))
    results = {"rows": rows, "args": vars(args)}
    write_json(directory / "results.json", results)
    return {**results, "files": [str(f) for f in files], "output_dir": str(directory)}


if __name__ == "__main__":
    main()
