"""Maximum-likelihood training of a :class:`~pyro_nf.Flow`, in pieces that every driver shares.

The pieces: the per-batch log-likelihood (:func:`batch_log_likelihood`), one guarded
optimizer update that refuses a non-finite loss or gradient
(:func:`optimization_step`), the last good parameters to fall back on
(:class:`LastGoodParameters`), the validation pass (:func:`validation_log_likelihood`)
and the early-stopping state (:class:`EarlyStopping`). The data split and the
minibatch loaders are in :mod:`pyro_nf.infer.data`. :func:`fit` assembles them into a
single-process loop with no dependency beyond torch; the Lightning modules of
:mod:`pyro_nf.lightning` assemble the same pieces for multi-process training.

The Pyro-native path is just as supported and needs no helper: register the flow with
``pyro.module``, observe the data under a plate, and run SVI with an empty guide (SVI
then maximizes the log-likelihood)::

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

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import pyro
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset
from tqdm.auto import tqdm

from pyro_nf._validation import integer, positive_number
from pyro_nf.flows import Flow
from pyro_nf.infer.data import ArrayDataset, batch_loader, prepare_batch, split_indices
from pyro_nf.infer.flow_matching import flow_matching_batch_loss, flow_matching_block

__all__ = [
    "FIT_DEFAULTS",
    "FIT_OBJECTIVES",
    "EarlyStopping",
    "FitHistory",
    "LastGoodParameters",
    "NonFiniteLossError",
    "ObjectiveDefaults",
    "batch_log_likelihood",
    "batch_loss",
    "check_objective",
    "compiled_batch_loss",
    "fit",
    "gradients_finite",
    "optimization_step",
    "validation_log_likelihood",
]

Batch = Tensor | Sequence[Tensor]

#: :func:`fit`'s training objectives: ``"likelihood"`` (maximum likelihood, any flow) and
#: ``"flow_matching"`` (:func:`~pyro_nf.infer.flow_matching_loss`, a flow of one ODE block).
FIT_OBJECTIVES = ("likelihood", "flow_matching")


@dataclass(frozen=True)
class ObjectiveDefaults:
    """:func:`fit`'s defaults for one objective (the arguments left at ``None``).

    Attributes:
        lr: the default Adam learning rate.
        epochs: the number of epochs, or None to run ``steps`` optimizer steps.
        steps: the optimizer steps of a run when ``epochs`` is None (rounded up to
            whole epochs; 100 epochs when the number of minibatches is unknown).
        steps_per_validation: the validation pass runs after every epoch that
            completes this many steps since the last one (rounded up to whole epochs),
            and after the last epoch.
        patience: validations without improvement before stopping (None: never stop
            early; the best validated epoch is still the one kept).
        cosine_decay: decay the learning rate from ``lr`` to 0 by a cosine over the run's
            steps (else it stays constant).
    """

    lr: float
    epochs: int | None
    steps: int | None
    steps_per_validation: int
    patience: int | None
    cosine_decay: bool


#: Per objective, chosen on the density suite (``docs/benchmarks/density.md``): the
#: likelihood at a constant lr 1e-3 for 100 epochs, validated after each, patience 10
#: (``benchmarks/fit_lr.py``); flow matching, whose step is one field evaluation instead
#: of an ODE solve, at lr 1e-2 for 50,000 steps with a cosine decay, validated every
#: 1000 steps, without early stopping (the decaying rate improves it to the end; with
#: patience 10 it stopped halfway on the rings, 3.462 against 3.320 without). Its 50
#: validations cost about 5% of the run (rings, 4000 points: 81.6 against 77.9 CPU s);
#: validating every 5000 steps or only at the end kept the same (last) epoch on three
#: toys, every 250 cost 20% more and once picked a worse epoch.
FIT_DEFAULTS = {
    "likelihood": ObjectiveDefaults(
        lr=1e-3, epochs=100, steps=None, steps_per_validation=1, patience=10, cosine_decay=False
    ),
    "flow_matching": ObjectiveDefaults(
        lr=1e-2,
        epochs=None,
        steps=50_000,
        steps_per_validation=1000,
        patience=None,
        cosine_decay=True,
    ),
}


@dataclass
class FitHistory:
    """What :func:`fit` did, epoch by epoch.

    Attributes:
        train_log_likelihood: mean log-likelihood per point of the training
            minibatches of each epoch (an average over the epoch's updates; empty for
            ``objective="flow_matching"``).
        train_flow_matching_loss: the mean flow-matching loss of each epoch's training
            minibatches (``objective="flow_matching"`` only).
        validation_log_likelihood: mean log-likelihood per validation point after each
            validated epoch (empty without a validation split).
        validation_epochs: the epochs (0-based) after which the validation pass ran:
            every epoch for the likelihood at its defaults, about every 1000 steps for
            flow matching (:data:`FIT_DEFAULTS`).
        best_epoch: the epoch (0-based) whose parameters the flow holds at the end.
        best_validation_log_likelihood: its validation log-likelihood (NaN without a
            validation split).
        stopped_early: whether training stopped before ``epochs`` for lack of progress.
        validation_index: the indices of ``data`` held out for validation (None when
            :func:`fit` made no split).
    """

    train_log_likelihood: list[float] = field(default_factory=list)
    train_flow_matching_loss: list[float] = field(default_factory=list)
    validation_log_likelihood: list[float] = field(default_factory=list)
    validation_epochs: list[int] = field(default_factory=list)
    best_epoch: int = -1
    best_validation_log_likelihood: float = math.nan
    stopped_early: bool = False
    validation_index: Tensor | None = None

    @property
    def epochs_run(self) -> int:
        """The number of completed epochs."""
        return max(len(self.train_log_likelihood), len(self.train_flow_matching_loss))


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient during training.

    The trained module holds its last good parameters when this is raised (for
    :func:`fit`: those of the end of the last completed epoch, or the initial ones for
    a failure in the first epoch).

    Attributes:
        epoch: the epoch (0-based) of the failure.
        step: the minibatch (0-based) within that epoch.
        history: the :class:`FitHistory` up to the last completed epoch.
    """

    def __init__(
        self, message: str, epoch: int, step: int, history: FitHistory | None = None
    ) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.history = history


# --------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------


def batch_log_likelihood(flow: Flow, x: Tensor, context: Tensor | None = None) -> Tensor:
    r"""``log p(x_i | c_i)`` per row, shape ``(B,)``: the x -> z (density) direction.

    Pyro's distribution validation is off here: the data were checked by
    :func:`~pyro_nf.infer.data.prepare_batch`, and a non-finite value produced inside
    the flow must reach the non-finite handling (:func:`optimization_step`) rather
    than fail a support check.

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=2, hidden_dims=(8,))
        >>> tuple(batch_log_likelihood(flow, torch.zeros(5, 2)).shape)
        (5,)
    """
    with pyro.validation_enabled(False):
        return flow.log_prob(x, context)


def batch_loss(flow: Flow, batch: Batch) -> tuple[Tensor, int]:
    r"""The training loss of one minibatch and its size: :math:`-\frac{1}{B}\sum_i \log p(x_i \mid c_i)`.

    ``batch`` is checked and moved to the flow's device and dtype by
    :func:`~pyro_nf.infer.data.prepare_batch`.

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=2, hidden_dims=(8,))
        >>> loss, size = batch_loss(flow, torch.zeros(5, 2))
        >>> loss.shape, size
        (torch.Size([]), 5)
    """
    x, context = prepare_batch(batch, flow.dim, flow.context_dim, flow.base_loc)
    return -batch_log_likelihood(flow, x, context).mean(), x.shape[0]


def compiled_batch_loss(
    flow: Flow, backend: bool | str = True
) -> Callable[[Flow, Batch], tuple[Tensor, int]]:
    """:func:`batch_loss` for ``flow`` with its density pass under ``torch.compile``.

    The minibatch is checked and moved eagerly (:func:`~pyro_nf.infer.data.prepare_batch`),
    then ``-log p(x | c).mean()`` runs compiled; under compile the pair cache is off and
    each layer runs once. ``backend``: ``True`` for torch's default, or a backend name.

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=1, hidden_dims=(8,))
        >>> loss_of = compiled_batch_loss(flow, "eager")
        >>> loss, size = loss_of(flow, torch.zeros(5, 2))
        >>> bool(torch.allclose(loss, batch_loss(flow, torch.zeros(5, 2))[0])), size
        (True, 5)
    """
    if not isinstance(backend, bool | str):
        raise TypeError(f"compile must be a bool or a backend name, got {type(backend).__name__}")
    options = {} if backend is True else {"backend": backend}

    def mean_negative_log_likelihood(x: Tensor, context: Tensor | None) -> Tensor:
        return -flow.log_prob(x, context).mean()

    compiled = torch.compile(mean_negative_log_likelihood, **options)

    def loss_of(flow_: Flow, batch: Batch) -> tuple[Tensor, int]:
        if flow_ is not flow:
            raise ValueError("this compiled loss was made for another flow")
        x, context = prepare_batch(batch, flow.dim, flow.context_dim, flow.base_loc)
        with pyro.validation_enabled(False):
            return compiled(x, context), x.shape[0]

    return loss_of


def gradients_finite(parameters: Iterable[Tensor]) -> bool:
    """Whether every gradient of ``parameters`` is finite (parameters without one pass).

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.tensor([1.0, float("nan")])
        >>> gradients_finite([p])
        False
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.abs().sum() for g in grads]).sum()))


def optimization_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    backward: Callable[[Tensor], None] | None = None,
    all_agree: Callable[[bool], bool] | None = None,
    gradient_clip: float = math.inf,
) -> str | None:
    """One optimizer update on ``loss``, refused when the loss or a gradient is not finite.

    Arguments:
        loss: a scalar to minimize.
        optimizer: its parameters' gradients are zeroed, computed and applied.
        backward: how to backpropagate (default ``loss.backward()``; Lightning passes
            ``manual_backward``, which also averages gradients across processes).
        all_agree: reduces a per-process "finite" decision to one shared by all
            processes (default: the identity, one process), so that processes skip an
            update together.
        gradient_clip: every gradient element is clamped to ``[-gradient_clip,
            gradient_clip]`` before the update, after the finiteness check (Pyro's
            ``ClippedAdam`` clamps the same way, its ``clip_norm``); ``inf``: none.

    Returns:
        None after an update; ``"loss"`` or ``"gradient"`` when the update was refused
        (the parameters are then untouched).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> optimization_step((w * float("inf")).sum(), torch.optim.SGD([w], lr=0.1))
        'loss'
    """
    agree = all_agree or (lambda decision: decision)
    if not agree(bool(torch.isfinite(loss))):
        return "loss"
    optimizer.zero_grad()
    (backward or Tensor.backward)(loss)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if not agree(gradients_finite(parameters)):
        optimizer.zero_grad()
        return "gradient"
    if gradient_clip < math.inf:
        torch.nn.utils.clip_grad_value_(parameters, gradient_clip)
    optimizer.step()
    return None


class LastGoodParameters:
    """A copy of a module's state to fall back on after a non-finite update.

    Example:
        >>> layer = torch.nn.Linear(1, 1); good = LastGoodParameters(layer)
        >>> _ = layer.weight.data.fill_(float("nan")); good.restore()
        >>> bool(torch.isfinite(layer.weight).all())
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.save()

    def save(self) -> None:
        """Remember the module's current state."""
        self.state = copy.deepcopy(self.module.state_dict())

    def restore(self) -> None:
        """Put the remembered state back (in place: optimizers keep their parameters)."""
        self.module.load_state_dict(self.state)


@torch.no_grad()
def validation_log_likelihood(flow: Flow, batches: Iterable[Batch]) -> float:
    """Mean ``log p(x | c)`` per point over ``batches``, in eval mode, without gradients.

    The flow's train/eval mode is restored afterwards.

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=2, hidden_dims=(8,))
        >>> value = validation_log_likelihood(flow, [torch.zeros(4, 2), torch.ones(2, 2)])
        >>> math.isfinite(value)
        True
    """
    was_training = flow.training
    flow.eval()
    total, count = 0.0, 0
    for batch in batches:
        x, c = prepare_batch(batch, flow.dim, flow.context_dim, flow.base_loc)
        total += float(batch_log_likelihood(flow, x, c).sum())
        count += x.shape[0]
    flow.train(was_training)
    if count == 0:
        raise ValueError("the validation data are empty")
    return total / count


@dataclass
class EarlyStopping:
    """Early-stopping state: the best value so far and the epochs since it improved.

    ``update(value, epoch)`` records a validation value (higher is better) and says
    whether it is a new best; :attr:`should_stop` turns true after ``patience`` epochs
    without one (never with ``patience=None``). A non-finite value never improves.

    Example:
        >>> stopping = EarlyStopping(patience=2)
        >>> tuple(stopping.update(v, epoch) for epoch, v in enumerate((1.0, 2.0, 1.5, 1.8)))
        (True, True, False, False)
        >>> stopping.should_stop, stopping.best_epoch
        (True, 1)
    """

    patience: int | None
    best: float = math.nan
    best_epoch: int = -1
    epochs_without_progress: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record the validation value of ``epoch``; True if it is a new best."""
        improved = math.isfinite(value) and (math.isnan(self.best) or value > self.best)
        if improved:
            self.best, self.best_epoch = value, epoch
            self.epochs_without_progress = 0
        else:
            self.epochs_without_progress += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs have passed without a new best."""
        return self.patience is not None and self.epochs_without_progress >= self.patience


# --------------------------------------------------------------------------------------
# Input checks and data sources of fit
# --------------------------------------------------------------------------------------


def _is_batch(batch: object) -> bool:
    if isinstance(batch, list | tuple):
        return bool(batch) and all(isinstance(t, Tensor) for t in batch)
    return isinstance(batch, Tensor)


def _is_map_dataset(data: object) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset)


def _loaders(
    flow: Flow,
    data: object,
    context: Tensor | None,
    validation_data: object,
    validation_fraction: float,
    batch_size: int,
    seed: int,
    num_workers: int,
) -> tuple[Iterable[Batch], Iterable[Batch] | None, Tensor | None]:
    """The training batches, the validation batches (or None) and the held-out indices."""
    if isinstance(data, Tensor):
        # The whole tensor is checked up front, before any training (a dataset or a
        # stream minibatch by minibatch), with the same checks.
        prepare_batch((data, context), flow.dim, flow.context_dim, like=None)
        data = ArrayDataset(data, context)
    elif context is not None:
        raise ValueError(
            "context= goes with a data tensor; a dataset or loader carries its context "
            f"in its items as (x, context) pairs (got data of type {type(data).__name__})"
        )
    elif isinstance(data, str | bytes) or not isinstance(data, Iterable | Dataset):
        raise ValueError(
            "expected data as a tensor of shape (N, D), a Dataset or an iterable of "
            f"minibatches, got {type(data).__name__}"
        )
    generator = torch.Generator().manual_seed(seed)
    if not _is_map_dataset(data):
        if isinstance(data, IterableDataset):  # an iterable of rows
            data = torch.utils.data.DataLoader(data, batch_size=batch_size)
        return data, _validation_batches(validation_data, batch_size), None
    split = validation_fraction if validation_data is None else 0.0
    train_index, validation_index = split_indices(len(data), split, generator)
    train = batch_loader(
        data,
        train_index,
        batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
    )
    if validation_data is not None:
        return train, _validation_batches(validation_data, batch_size), None
    if len(validation_index) == 0:
        return train, None, None
    validation = batch_loader(
        data, validation_index, batch_size, shuffle=False, generator=generator
    )
    return train, validation, validation_index


def _validation_batches(validation_data: object, batch_size: int) -> Iterable[Batch] | None:
    if validation_data is None:
        return None
    if isinstance(validation_data, Tensor):
        validation_data = ArrayDataset(validation_data)
    elif isinstance(validation_data, tuple) and all(isinstance(t, Tensor) for t in validation_data):
        validation_data = ArrayDataset(*validation_data)
    if _is_map_dataset(validation_data):
        indices = torch.arange(len(validation_data))
        return batch_loader(
            validation_data, indices, batch_size, shuffle=False, generator=torch.Generator()
        )
    if isinstance(validation_data, IterableDataset):
        return torch.utils.data.DataLoader(validation_data, batch_size=batch_size)
    return validation_data


# --------------------------------------------------------------------------------------
# fit: the single-process driver
# --------------------------------------------------------------------------------------


def fit(
    flow: Flow,
    data: Tensor | Dataset | Iterable[Batch],
    context: Tensor | None = None,
    *,
    validation_data: Tensor | tuple[Tensor, Tensor] | Dataset | Iterable[Batch] | None = None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float | None = None,
    validation_fraction: float = 0.1,
    patience: int | None | str = "auto",
    seed: int = 0,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    num_workers: int = 0,
    compile: bool | str = False,
    objective: str = "likelihood",
) -> FitHistory:
    r"""Train a flow by maximum likelihood (or flow matching) with minibatches and early stopping.

    .. math::
        \max_\phi \frac{1}{|B|} \sum_{i \in B} \log p_\phi(x_i \mid c_i)

    over shuffled minibatches ``B`` of the training split (``objective="likelihood"``,
    the default), with Adam at a constant rate. After each epoch the mean
    log-likelihood of the validation split is computed (in eval mode, without
    gradients); training stops when it has not improved for ``patience`` validations,
    and the parameters of the best validated epoch are restored at the end. Without
    validation data every epoch runs and the final parameters are kept. Direction: the
    loss evaluates x -> z (density), the cheap direction of MAF and coupling flows.

    A flow of one ODE block (``pyro_nf.cnf(dim)``) can instead be trained by flow
    matching (``objective="flow_matching"``): each step regresses its vector field on
    straight paths from base draws to the minibatch
    (:func:`~pyro_nf.infer.flow_matching_loss`), one field evaluation per point instead
    of an ODE solve. Its defaults (:data:`FIT_DEFAULTS`, measured in
    ``docs/benchmarks/density.md``) are many cheap steps: 50,000 steps at lr 1e-2
    decayed to 0 by a cosine, validated by the log-likelihood every 1000 steps, without
    early stopping (the best validated parameters are kept). Its
    base draws and times come from torch's random state seeded by ``seed``, restored
    afterwards.

    The data may be:

    - a tensor ``(N, D)`` with an optional ``context`` ``(N, C)``: a random
      ``validation_fraction`` of the rows is held out (``history.validation_index``);
    - a map-style :class:`~torch.utils.data.Dataset` whose items are rows ``x`` or
      pairs ``(x, context)``: split and shuffled in the same way, so a dataset and the
      equivalent tensor give the same minibatches and the same parameters for the same
      seed (an :class:`~pyro_nf.infer.data.ArrayDataset` reads a whole minibatch at a
      time, e.g. from a memory-mapped ``.npy`` file);
    - an iterable of ready minibatches (a ``DataLoader``,
      :class:`~pyro_nf.infer.data.NpyBatches` streaming from disk) or an
      ``IterableDataset`` of rows (batched here): used as given, each pass one epoch;
      there is no automatic split, validation comes from ``validation_data`` only.

    ``validation_data`` (a tensor, an ``(x, context)`` pair of tensors, a dataset or an
    iterable of minibatches) replaces the automatic split.

    Either way, a non-finite loss or gradient stops training: the parameters of the end
    of the last completed epoch are restored and :class:`NonFiniteLossError` (a
    ``FloatingPointError``) is raised, naming the epoch and step and carrying the
    history. The optimizer's state is not restored. Invalid minibatches in a dataset or
    stream raise ``ValueError`` when they are read, after the same restore.

    Arguments:
        flow: the flow to train in place (its device and dtype are used: minibatches are
            moved there).
        data: the training data (see above).
        context: shape ``(N, flow.context_dim)`` with a data tensor and a conditional
            flow, else None.
        validation_data: explicit validation data (see above), or None.
        epochs: the maximum number of passes over the training data (None: the
            objective's default, :data:`FIT_DEFAULTS`: 100 for the likelihood, as many as
            make 50,000 steps for flow matching).
        batch_size: the minibatch size (for tensors, datasets and iterable datasets).
        lr: the learning rate of the default Adam optimizer (None: the objective's
            default, 1e-3 for the likelihood and 1e-2 for flow matching).
        validation_fraction: the fraction held out of a tensor or map-style dataset, in
            ``[0, 1)``, when ``validation_data`` is None.
        patience: validation passes without improvement before stopping (None: never
            stop early; ``"auto"``: the objective's default, 10 for the likelihood, None
            for flow matching). The likelihood validates after every epoch, flow
            matching about every 1000 steps.
        seed: the seed of the split and of the shuffling (the global RNG is untouched).
        progress: show a tqdm progress bar over epochs.
        optimizer: an optimizer over the flow's parameters (default:
            ``torch.optim.Adam(flow.parameters(), lr)``); with flow matching its
            learning rate is decayed by the same cosine.
        num_workers: ``DataLoader`` worker processes reading a dataset (0: read in this
            process).
        compile: ``True`` runs each minibatch's loss through ``torch.compile`` (a
            backend name such as ``"inductor"`` picks the backend); the guarded
            optimizer step and the validation pass stay eager. It pays for long fits:
            on one CPU thread a training step of the benchmark flows (D = 16, batch
            4096, 5 layers of 256) took 0.89x (MAF) to 0.95x (real NVP) of eager, after
            5 to 10 s of compilation (``benchmarks/compile.py``,
            ``docs/benchmarks/performance.md``). Likelihood objective only.
        objective: ``"likelihood"`` or ``"flow_matching"`` (:data:`FIT_OBJECTIVES`).

    Returns:
        a :class:`FitHistory`.

    Raises:
        ValueError, TypeError: on invalid input (a wrong type: TypeError; a wrong value:
            ValueError), before any training (for a dataset or stream: when the
            offending minibatch is read).
        NonFiniteLossError: on a non-finite loss or gradient.

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=2, hidden_dims=(16,))
        >>> data = torch.randn(200, 2) * 2.0 + 1.0
        >>> history = fit(flow, data, epochs=5, batch_size=50, lr=1e-2, progress=False)
        >>> history.epochs_run, len(history.validation_log_likelihood)
        (5, 5)
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyro_nf.Flow, got {type(flow).__name__}")
    if isinstance(data, list | tuple) and not all(_is_batch(b) for b in data):
        # A nested list of numbers is not a minibatch source: say what a tensor should have been.
        raise ValueError(f"expected data of shape (N, {flow.dim}), got {type(data).__name__}")
    if not isinstance(validation_fraction, int | float) or not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    flow_matching = check_objective(flow, objective)
    defaults = FIT_DEFAULTS[objective]
    if epochs is not None:
        epochs = integer("epochs", epochs)
    batch_size = integer("batch_size", batch_size)
    if patience == "auto":
        patience = defaults.patience
    elif patience is not None:
        patience = integer("patience", patience)
    num_workers = integer("num_workers", num_workers, minimum=0)
    if optimizer is None:
        lr = positive_number("lr", defaults.lr if lr is None else lr)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    if flow_matching and compile is not False:
        raise ValueError("compile applies to the likelihood objective, not to flow matching")
    train_batches, validation_batches, validation_index = _loaders(
        flow, data, context, validation_data, validation_fraction, batch_size, seed, num_workers
    )
    if optimizer is None:
        optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    batches_per_epoch = _number_of_batches(train_batches)
    if epochs is None:
        epochs = defaults.epochs or (
            math.ceil(defaults.steps / batches_per_epoch) if batches_per_epoch else 100
        )
    validate_every = (
        math.ceil(defaults.steps_per_validation / batches_per_epoch) if batches_per_epoch else 1
    )
    # A cosine decay per step over the run (per epoch when the epoch's length is unknown).
    schedule, per_step = None, batches_per_epoch is not None
    if defaults.cosine_decay:
        length = epochs * batches_per_epoch if per_step else epochs
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, length, eta_min=0.0)
    if flow_matching:
        loss_of = flow_matching_batch_loss
    else:
        loss_of = batch_loss if compile is False else compiled_batch_loss(flow, compile)

    history = FitHistory(validation_index=validation_index)
    # The history records the likelihood objective as a log-likelihood, flow matching as its loss.
    if flow_matching:
        train_record, sign = history.train_flow_matching_loss, 1.0
    else:
        train_record, sign = history.train_log_likelihood, -1.0
    stopping = EarlyStopping(patience if validation_batches is not None else None)
    last_good = LastGoodParameters(flow)
    best_state = None
    was_training = flow.training
    flow.train()
    bar = tqdm(range(epochs), disable=not progress, desc="fit", unit="epoch")
    random_state = _seeded_random_state(seed) if flow_matching else contextlib.nullcontext()
    try:
        with random_state:
            for epoch in bar:
                step_schedule = schedule if per_step else None
                mean_loss = _train_epoch(
                    flow, train_batches, optimizer, epoch, history, loss_of, step_schedule
                )
                if schedule is not None and not per_step:
                    schedule.step()
                train_record.append(sign * mean_loss)
                last_good.save()
                postfix = {"train": f"{train_record[-1]:.3f}"}
                last = epoch == epochs - 1
                if validation_batches is not None and ((epoch + 1) % validate_every == 0 or last):
                    value = validation_log_likelihood(flow, validation_batches)
                    history.validation_log_likelihood.append(value)
                    history.validation_epochs.append(epoch)
                    postfix["validation"] = f"{value:.3f}"
                    if stopping.update(value, epoch):
                        best_state = last_good.state
                bar.set_postfix(postfix)
                if stopping.should_stop:
                    history.stopped_early = True
                    break
    except (NonFiniteLossError, ValueError):
        last_good.restore()
        raise
    finally:
        bar.close()
        flow.train(was_training)
    if best_state is not None:
        flow.load_state_dict(best_state)
        history.best_epoch = stopping.best_epoch
        history.best_validation_log_likelihood = stopping.best
    else:
        history.best_epoch = history.epochs_run - 1
    return history


def check_objective(flow: Flow, objective: str) -> bool:
    """Check a training objective for ``flow``; True for flow matching.

    Raises:
        ValueError: ``objective`` is not one of :data:`FIT_OBJECTIVES`, or it is
            ``"flow_matching"`` and the flow is not one ODE block
            (:func:`~pyro_nf.infer.flow_matching.flow_matching_block`).

    Example:
        >>> check_objective(pyro_nf.cnf(2, hidden_dims=(8,)), "flow_matching")
        True
    """
    if objective not in FIT_OBJECTIVES:
        raise ValueError(f"objective must be one of {FIT_OBJECTIVES}, got {objective!r}")
    if objective == "flow_matching":
        flow_matching_block(flow)  # a flow of one ODE block, or a ValueError that says so
        return True
    return False


def _train_epoch(
    flow: Flow,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: FitHistory,
    loss_of: Callable[[Flow, Batch], tuple[Tensor, int]] = batch_loss,
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass of updates (each followed by a step of ``schedule``, if any); the mean
    training loss per point of the pass."""
    total, count = 0.0, 0
    for step, batch in enumerate(batches):
        loss, size = loss_of(flow, batch)
        failure = optimization_step(loss, optimizer)
        if failure is None and schedule is not None:
            schedule.step()
        if failure is not None:
            start = "the start" if epoch == 0 else f"the end of epoch {epoch - 1}"
            raise NonFiniteLossError(
                f"non-finite {failure} at epoch {epoch}, step {step}; the flow holds the "
                f"parameters of {start}",
                epoch=epoch,
                step=step,
                history=history,
            )
        total += float(loss.detach()) * size
        count += size
    if count == 0:
        raise ValueError("the training data are empty")
    return total / count


def _number_of_batches(batches: Iterable[Batch]) -> int | None:
    """The minibatches per pass of ``batches``, or None when it has no length."""
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
    return length or None


@contextlib.contextmanager
def _seeded_random_state(seed: int) -> Iterator[None]:
    """Run the block on torch's random state seeded by ``seed``, then restore the state.

    The draws of a training objective (flow matching's base draws and times) are then
    fixed by ``fit``'s ``seed`` and leave the caller's random state untouched.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
