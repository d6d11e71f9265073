"""The package's main job: fit a flow to a 2-D toy density and compare it with a Gaussian.

``python -m pyro_nf`` fits a real NVP flow to one of :mod:`pyro_nf.datasets`' toy
densities (two moons by default) by maximum likelihood with :func:`pyro_nf.fit`
(minibatches, early stopping on a validation split) and prints its held-out
log-likelihood beside a fitted Gaussian's.

The same flow is a Pyro density model too: :func:`density_model` observes data under
a plate, and :func:`fit_with_svi` trains it with Pyro's SVI and an empty guide (the
Pyro-native path, which needs no helper of this package).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam
from torch import Tensor

from pyro_nf import datasets
from pyro_nf.flows import Flow, realnvp
from pyro_nf.infer.training import fit

__all__ = ["density_model", "fit_with_svi", "gaussian_log_likelihood", "main"]


def density_model(flow: Flow, name: str = "flow") -> Callable[[Tensor], None]:
    """A Pyro model whose likelihood is ``flow``: ``x_n ~ flow()`` under a plate.

    The returned ``model(data)`` registers the flow's parameters with ``pyro.module``
    and observes ``data`` of shape ``(N, D)``. Train it with SVI and an empty guide
    (maximum likelihood), see :func:`fit_with_svi`.
    """

    def model(data: Tensor, num_data: int | None = None) -> None:
        pyro.module(name, flow)
        with pyro.plate("data", num_data or data.shape[0], subsample_size=data.shape[0]):
            pyro.sample("x", flow(), obs=data)

    return model


def fit_with_svi(
    flow: Flow,
    data: Tensor,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    name: str = "flow",
) -> list[float]:
    """Maximum-likelihood training of ``flow`` on ``data`` (N, D) through Pyro's SVI.

    The guide is empty: there are no latent sites, so the ELBO is the minibatch
    log-likelihood scaled to the full data set. Returns the loss per step
    (negative log-likelihood per data point).
    """
    if data.dim() != 2 or data.shape[-1] != flow.dim:
        raise ValueError(f"expected data of shape (N, {flow.dim}), got {tuple(data.shape)}")
    model = density_model(flow, name)

    def guide(batch: Tensor, num_data: int | None = None) -> None:
        pass

    pyro.get_param_store().clear()
    generator = torch.Generator().manual_seed(seed)
    svi = SVI(model, guide, ClippedAdam({"lr": lr, "clip_norm": 10.0}), Trace_ELBO())
    losses = []
    for _ in range(steps):
        index = torch.randint(data.shape[0], (min(batch_size, data.shape[0]),), generator=generator)
        losses.append(svi.step(data[index], data.shape[0]) / data.shape[0])
    return losses


def gaussian_log_likelihood(train: Tensor, test: Tensor) -> float:
    """Mean held-out log-likelihood of a Gaussian fitted to ``train`` by maximum likelihood.

    Example:
        >>> data = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
        >>> round(gaussian_log_likelihood(data[:1000], data[1000:]), 1)  # -log(2 pi e)
        -2.8
    """
    centered = train - train.mean(0)
    covariance = centered.T @ centered / train.shape[0]
    gaussian = dist.MultivariateNormal(train.mean(0), covariance_matrix=covariance)
    return gaussian.log_prob(test).mean().item()


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_nf", description="Fit a real NVP flow to a 2-D toy density."
    )
    parser.add_argument("--density", default="two_moons", choices=sorted(datasets.TOY_DENSITIES))
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument(
        "--steps", type=int, default=1500, help="budget of optimizer steps (whole epochs)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--patience", type=int, default=20, help="early-stopping patience")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (the networks are small: one thread is fastest, and on a busy "
        "machine several OpenMP threads can stall each other)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = datasets.toy_density(args.density, args.num_samples, seed=args.seed)
    train, test = datasets.train_test_split(data, test_fraction=0.25, seed=args.seed)
    flow = realnvp(dim=2, num_layers=args.layers, hidden_dims=(64, 64), coupling_function="affine")
    print(
        f"Fitting real NVP ({args.layers} coupling layers) to {args.density}: {len(train)} training points"
    )
    validation_fraction = 0.1
    num_fit = len(train) - round(len(train) * validation_fraction)
    steps_per_epoch = -(-num_fit // args.batch_size)
    start = time.perf_counter()
    history = fit(
        flow,
        train,
        epochs=max(1, -(-args.steps // steps_per_epoch)),
        batch_size=args.batch_size,
        lr=3e-3,
        validation_fraction=validation_fraction,
        patience=args.patience,
        seed=args.seed,
        progress=False,
    )
    elapsed = time.perf_counter() - start
    flow.eval()
    with torch.no_grad():
        flow_ll = flow.log_prob(test).mean().item()
    gauss_ll = gaussian_log_likelihood(train, test)
    print(
        f"trained {history.epochs_run} epochs ({history.epochs_run * steps_per_epoch} steps) "
        f"in {elapsed:.1f} s; kept epoch {history.best_epoch} "
        f"(validation log-likelihood {history.best_validation_log_likelihood:.3f})"
    )
    print(f"held-out log-likelihood per point on {len(test)} test points:")
    print(f"  real NVP flow     {flow_ll:8.3f}")
    print(f"  fitted Gaussian   {gauss_ll:8.3f}")
    print(f"  difference        {flow_ll - gauss_ll:8.3f} nats in favour of the flow")
    return {"flow": flow_ll, "gaussian": gauss_ll}
