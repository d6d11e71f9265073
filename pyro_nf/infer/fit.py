"""Maximum-likelihood training of a :class:`~pyro_nf.Flow` on data, with early stopping.

:func:`fit` is the short path for density estimation. The Pyro-native path is just as
supported and needs no helper: register the flow with ``pyro.module``, observe the
data under a plate, and run SVI with an empty guide (SVI then maximizes the
log-likelihood)::

    flow = pyro_nf.realnvp(dim=2)

    def model(data):
        pyro.module("flow", flow)
        with pyro.plate("data", data.shape[0], subsample_size=256) as index:
            pyro.sample("x", flow(), obs=data[index])

    def guide(data):
        pass

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    for step in range(1000):
        svi.step(data)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pyro
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyro_nf.flows import Flow

__all__ = ["FitHistory", "NonFiniteLossError", "fit"]


@dataclass
class FitHistory:
    """What :func:`fit` did, epoch by epoch.

    Attributes:
        train_log_likelihood: mean log-likelihood per point of the training
            minibatches of each epoch (an average over the epoch's updates).
        validation_log_likelihood: mean log-likelihood per validation point after each
            epoch (empty without a validation split).
        best_epoch: the epoch (0-based) whose parameters the flow holds at the end.
        best_validation_log_likelihood: its validation log-likelihood (NaN without a
            validation split).
        stopped_early: whether training stopped before ``epochs`` for lack of progress.
        validation_index: the indices of ``data`` held out for validation.
    """

    train_log_likelihood: list[float] = field(default_factory=list)
    validation_log_likelihood: list[float] = field(default_factory=list)
    best_epoch: int = -1
    best_validation_log_likelihood: float = math.nan
    stopped_early: bool = False
    validation_index: Tensor | None = None

    @property
    def epochs_run(self) -> int:
        """The number of completed epochs."""
        return len(self.train_log_likelihood)


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient during :func:`fit`.

    The flow holds the parameters of the end of the last completed epoch (or the
    initial ones for a failure in the first epoch) when this is raised.

    Attributes:
        epoch: the epoch (0-based) of the failure.
        step: the minibatch (0-based) within that epoch.
        history: the :class:`FitHistory` up to the last completed epoch.
    """

    def __init__(self, message: str, epoch: int, step: int, history: FitHistory) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.history = history


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_inputs(
    flow: Flow, data: Tensor, context: Tensor | None, validation_fraction: float
) -> None:
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyro_nf.Flow, got {type(flow).__name__}")
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[1] != flow.dim:
        shape = tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"expected data of shape (N, {flow.dim}), got {shape}")
    if not torch.isfinite(data).all():
        raise ValueError("data contains non-finite values (NaN or inf)")
    if flow.context_dim > 0:
        if context is None:
            raise ValueError(
                f"the flow is conditional: pass a context of shape (N, {flow.context_dim})"
            )
        if not isinstance(context, Tensor) or tuple(context.shape) != (
            data.shape[0],
            flow.context_dim,
        ):
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context)
            raise ValueError(
                f"expected a context of shape ({data.shape[0]}, {flow.context_dim}), got {shape}"
            )
        if not torch.isfinite(context).all():
            raise ValueError("context contains non-finite values (NaN or inf)")
    elif context is not None:
        raise ValueError("the flow is unconditional (context_dim=0) but a context was given")
    if not isinstance(validation_fraction, int | float) or not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")


def _snapshot(flow: Flow) -> dict[str, Tensor]:
    return copy.deepcopy(flow.state_dict())


def _gradients_finite(flow: Flow) -> bool:
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.abs().sum() for g in grads]).sum()))


def fit(
    flow: Flow,
    data: Tensor,
    context: Tensor | None = None,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int | None = 10,
    seed: int = 0,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
) -> FitHistory:
    r"""Train a flow by maximum likelihood with minibatches and early stopping.

    .. math::
        \max_\phi \frac{1}{|B|} \sum_{i \in B} \log p_\phi(x_i \mid c_i)

    over shuffled minibatches ``B`` of the training split. After each epoch the mean
    log-likelihood of the held-out validation split is computed (in eval mode, without
    gradients); training stops when it has not improved for ``patience`` epochs, and
    the parameters of the best epoch are restored at the end. Without a validation
    split (``validation_fraction=0``) every epoch runs and the final parameters are
    kept. Direction: the loss evaluates x -> z (density), the cheap direction of MAF and
    coupling flows.

    A non-finite loss or gradient stops training: the parameters of the end of the last
    completed epoch are restored and :class:`NonFiniteLossError` (a
    ``FloatingPointError``) is raised, naming the epoch and step and carrying the
    history. The optimizer's state is not restored.

    Arguments:
        flow: the flow to train in place (its device and dtype are used: minibatches are
            moved there).
        data: shape ``(N, flow.dim)``.
        context: shape ``(N, flow.context_dim)`` for a conditional flow, else None.
        epochs: the maximum number of passes over the training split.
        batch_size: the minibatch size.
        lr: the learning rate of the default Adam optimizer.
        validation_fraction: the fraction of ``data`` held out, in ``[0, 1)``.
        patience: epochs without validation improvement before stopping (None: never
            stop early).
        seed: the seed of the split and of the shuffling (the global RNG is untouched).
        progress: show a tqdm progress bar over epochs.
        optimizer: an optimizer over the flow's parameters (default:
            ``torch.optim.Adam(flow.parameters(), lr)``).

    Returns:
        a :class:`FitHistory`.

    Raises:
        ValueError, TypeError: on invalid input, before any training.
        NonFiniteLossError: on a non-finite loss or gradient.

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=2, hidden_dims=(16,))
        >>> data = torch.randn(200, 2) * 2.0 + 1.0
        >>> history = fit(flow, data, epochs=5, batch_size=50, lr=1e-2, progress=False)
        >>> history.epochs_run, len(history.validation_log_likelihood)
        (5, 5)
    """
    _check_inputs(flow, data, context, validation_fraction)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    if patience is not None:
        patience = _positive_int("patience", patience)
    if optimizer is None:
        if not isinstance(lr, int | float) or not lr > 0:
            raise ValueError(f"lr must be a positive float, got {lr!r}")
        optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")

    num_points = data.shape[0]
    num_validation = round(num_points * validation_fraction) if validation_fraction > 0 else 0
    if validation_fraction > 0:
        num_validation = max(1, num_validation)
    num_train = num_points - num_validation
    if num_train < 1:
        raise ValueError(
            f"no training data left: {num_points} points with validation_fraction="
            f"{validation_fraction}"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_points, generator=generator)
    train_index, validation_index = order[:num_train], order[num_train:]

    like = flow.base_loc

    def log_likelihood(x: Tensor, c: Tensor | None) -> Tensor:
        # The data were checked up front; a non-finite value inside the flow must reach
        # the non-finite handling below rather than fail a distribution's validation.
        with pyro.validation_enabled(False):
            return flow.log_prob(x, c)

    def batch_of(index: Tensor) -> tuple[Tensor, Tensor | None]:
        index = index.to(data.device)
        x = data[index].to(device=like.device, dtype=like.dtype)
        c = None if context is None else context[index.to(context.device)]
        return x, None if c is None else c.to(device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def validation_log_likelihood() -> float:
        was_training = flow.training
        flow.eval()
        total = 0.0
        for chunk in validation_index.split(batch_size):
            x, c = batch_of(chunk)
            total += float(log_likelihood(x, c).sum())
        flow.train(was_training)
        return total / num_validation

    history = FitHistory(validation_index=validation_index if num_validation else None)
    best_state = None
    last_good_state = _snapshot(flow)
    epochs_without_progress = 0
    was_training = flow.training
    flow.train()
    bar = tqdm(range(epochs), disable=not progress, desc="fit", unit="epoch")
    for epoch in bar:
        epoch_total, epoch_count = 0.0, 0
        permutation = train_index[torch.randperm(num_train, generator=generator)]
        for step, chunk in enumerate(permutation.split(batch_size)):
            x, c = batch_of(chunk)
            loss = -log_likelihood(x, c).mean()
            finite = bool(torch.isfinite(loss))
            if finite:
                optimizer.zero_grad()
                loss.backward()
                finite = _gradients_finite(flow)
            if not finite:
                flow.load_state_dict(last_good_state)
                flow.train(was_training)
                bar.close()
                raise NonFiniteLossError(
                    f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'} at "
                    f"epoch {epoch}, step {step}; the flow holds the parameters of "
                    f"{'the start' if epoch == 0 else f'the end of epoch {epoch - 1}'}",
                    epoch=epoch,
                    step=step,
                    history=history,
                )
            optimizer.step()
            epoch_total += float(loss.detach()) * x.shape[0]
            epoch_count += x.shape[0]
        history.train_log_likelihood.append(-epoch_total / epoch_count)
        last_good_state = _snapshot(flow)
        postfix = {"train": f"{history.train_log_likelihood[-1]:.3f}"}
        if num_validation:
            value = validation_log_likelihood()
            history.validation_log_likelihood.append(value)
            postfix["validation"] = f"{value:.3f}"
            best = history.best_validation_log_likelihood
            if math.isfinite(value) and (math.isnan(best) or value > best):
                history.best_epoch = epoch
                history.best_validation_log_likelihood = value
                best_state = last_good_state
                epochs_without_progress = 0
            else:
                epochs_without_progress += 1
        bar.set_postfix(postfix)
        if patience is not None and num_validation and epochs_without_progress >= patience:
            history.stopped_early = True
            break
    bar.close()
    flow.train(was_training)
    if best_state is not None:
        flow.load_state_dict(best_state)
    else:
        history.best_epoch = history.epochs_run - 1
    return history
