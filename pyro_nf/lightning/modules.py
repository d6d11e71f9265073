"""Lightning modules for maximum likelihood and SVI, built from :mod:`pyro_nf.infer.training`.

Both modules use Lightning's manual optimization so that one update goes through the
same guarded step as :func:`pyro_nf.fit` (:func:`~pyro_nf.infer.training.optimization_step`):
a non-finite loss or gradient on any process refuses the update on every process,
puts back the parameters of the end of the last completed epoch
(:class:`~pyro_nf.infer.training.LastGoodParameters`), records the reason in
``module.non_finite`` and stops the trainer.

Data parallel (``Trainer(strategy="ddp", devices=N)``): every process computes the
loss of its part of the global minibatch and DDP averages the gradients, which is the
gradient of the global minibatch when the parts have equal sizes (a mean loss per
part, as here; for SVI the model's plate scales each part's likelihood to the data
set). Processes start from the same seed, so global latent variables get the same draw
on every process, as one process would draw them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from torch import Tensor, nn

from pyro_nf._validation import positive_number
from pyro_nf.flows import Flow
from pyro_nf.infer.data import prepare_batch
from pyro_nf.infer.flow_matching import flow_matching_batch_loss
from pyro_nf.infer.training import (
    LastGoodParameters,
    batch_log_likelihood,
    batch_loss,
    check_objective,
    optimization_step,
)

__all__ = ["FlowDensityModule", "SVIModule"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

_RNG_KEY = "pyro_nf_rng_state"


class _GuardedTraining(pl.LightningModule):
    """Manual optimization through the shared guarded step, and exact resumption."""

    def __init__(self, lr: float, optimizer: OptimizerFactory | None) -> None:
        super().__init__()
        if optimizer is None:
            lr = positive_number("lr", lr)
        if optimizer is not None and not callable(optimizer):
            raise TypeError(
                "optimizer must be a callable from parameters to a torch optimizer, "
                f"got {type(optimizer).__name__}"
            )
        self.automatic_optimization = False
        self.lr = lr
        self.optimizer_factory = optimizer
        #: Why training stopped on a non-finite value (None while all is finite).
        self.non_finite: str | None = None
        self._last_good: LastGoodParameters | None = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = list(self.parameters())
        if not parameters:
            raise ValueError("the module has no parameters to train")
        if self.optimizer_factory is None:
            return torch.optim.Adam(parameters, lr=self.lr)
        return self.optimizer_factory(parameters)

    def on_fit_start(self) -> None:
        self.non_finite = None
        self._last_good = LastGoodParameters(self)

    def on_train_epoch_end(self) -> None:
        if self._last_good is not None and self.non_finite is None:
            self._last_good.save()

    def _update(self, loss: Tensor, batch_idx: int) -> None:
        strategy = self.trainer.strategy
        failure = optimization_step(
            loss,
            self.optimizers(),
            backward=self.manual_backward,
            all_agree=lambda decision: strategy.reduce_boolean_decision(decision, all=True),
        )
        if failure is None:
            return
        if self._last_good is not None:
            self._last_good.restore()
        self.non_finite = (
            f"non-finite {failure} at epoch {self.current_epoch}, step {batch_idx}; the "
            "module holds the parameters of "
            + (
                "the start"
                if self.current_epoch == 0
                else f"the end of epoch {self.current_epoch - 1}"
            )
        )
        rank_zero_warn(self.non_finite)
        self.trainer.should_stop = True

    # Every process is seeded alike and draws alike: the checkpoint keeps the random
    # state so that a resumed run draws what the uninterrupted run would have drawn.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[_RNG_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_RNG_KEY)
        if state is None:
            return
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class FlowDensityModule(_GuardedTraining):
    r"""Maximum-likelihood training of a :class:`~pyro_nf.Flow` as a ``LightningModule``.

    .. math::
        \min_\phi -\frac{1}{|B|} \sum_{i \in B} \log p_\phi(x_i \mid c_i)

    per minibatch (x -> z, the density direction), the loss of :func:`pyro_nf.fit`.
    With ``objective="flow_matching"`` a flow of one ODE block is trained by
    :func:`~pyro_nf.infer.flow_matching_loss` instead (as ``fit(...,
    objective="flow_matching")``; its base draws and times come from the global random
    state, which Lightning seeds and checkpoints keep).
    Minibatches are ``x`` of shape ``(B, D)`` or ``(x, context)`` pairs for a
    conditional flow. Logged: ``train_log_likelihood`` (or
    ``train_flow_matching_loss``) and, with validation data,
    ``validation_log_likelihood`` (mean per point; monitor it with Lightning's
    ``EarlyStopping(monitor="validation_log_likelihood", mode="max")`` and
    ``ModelCheckpoint``).

    Arguments:
        flow: the flow to train (a submodule: checkpoints hold its state).
        lr: the learning rate of the default Adam optimizer.
        optimizer: a callable from parameters to a torch optimizer, replacing Adam.
        objective: ``"likelihood"`` or ``"flow_matching"``
            (:data:`~pyro_nf.infer.FIT_OBJECTIVES`).

    Example:
        >>> flow = pyro_nf.realnvp(dim=2, num_layers=2, hidden_dims=(8,))
        >>> module = FlowDensityModule(flow, lr=1e-2)
        >>> trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> data = torch.utils.data.DataLoader(torch.randn(32, 2), batch_size=16)
        >>> trainer.fit(module, train_dataloaders=data)
        >>> trainer.global_step
        2
    """

    def __init__(
        self,
        flow: Flow,
        lr: float = 1e-3,
        optimizer: OptimizerFactory | None = None,
        objective: str = "likelihood",
    ) -> None:
        if not isinstance(flow, Flow):
            raise TypeError(f"flow must be a pyro_nf.Flow, got {type(flow).__name__}")
        check_objective(flow, objective)
        super().__init__(lr, optimizer)
        self.flow = flow
        self.objective = objective

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        if self.objective == "flow_matching":
            loss, size = flow_matching_batch_loss(self.flow, batch)
            name, value = "train_flow_matching_loss", loss.detach()
        else:
            loss, size = batch_loss(self.flow, batch)
            name, value = "train_log_likelihood", -loss.detach()
        self._update(loss, batch_idx)
        self.log(name, value, prog_bar=True, batch_size=size)
        return loss.detach()

    def validation_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        x, c = prepare_batch(batch, self.flow.dim, self.flow.context_dim, self.flow.base_loc)
        value = batch_log_likelihood(self.flow, x, c).mean()
        self.log(
            "validation_log_likelihood", value, prog_bar=True, batch_size=len(x), sync_dist=True
        )


class SVIModule(_GuardedTraining):
    r"""Stochastic variational inference for a Pyro model and guide as a ``LightningModule``.

    Each step minimizes the ELBO estimate ``loss.differentiable_loss(model, guide,
    *batch)`` (by default ``Trace_ELBO()``), i.e. maximizes

    .. math::
        \mathbb{E}_{q_\phi(z)}\left[\log p_\theta(x_B, z) - \log q_\phi(z)\right]

    with the model's plate scaling the minibatch ``x_B`` to the data set. Works with
    :class:`~pyro_nf.AutoFlow`, :class:`~pyro_nf.AmortizedFlowGuide`, Pyro's
    autoguides or any guide whose parameters live in ``nn.Module``\ s (a ``PyroModule``,
    or modules registered with ``pyro.module`` inside ``model`` / ``guide`` when those
    are modules themselves). A minibatch ``batch`` is passed as ``model(*batch)`` (a
    single tensor as ``model(batch)``). Logged: ``train_elbo`` and ``validation_elbo``
    (per data set, as the model scales it).

    Guides that create their parameters lazily (autoguides) are run once on a warm-up
    minibatch in ``setup``, before Lightning configures the optimizer and wraps the
    module for DDP: ``example_batch`` if given, else the first minibatch of the
    trainer's training data (it draws from the global random state, as a first step
    would: seed before ``trainer.fit`` for reproducible runs).

    Arguments:
        model, guide: the Pyro model and guide (callables; ``nn.Module``\ s become
            submodules, and checkpoints hold their state).
        loss: an ELBO with ``differentiable_loss`` (default ``Trace_ELBO()``).
        lr: the learning rate of the default Adam optimizer.
        optimizer: a callable from parameters to a torch optimizer, replacing Adam.
        example_batch: the warm-up minibatch (default: the first training minibatch).

    Example:
        >>> def model(x):
        ...     loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 10.0))
        ...     with pyro.plate("data", 100, subsample=torch.arange(len(x))):
        ...         pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=x)
        >>> guide = pyro_nf.AutoFlow(model, flow="iaf")
        >>> module = SVIModule(model, guide, lr=1e-2)
        >>> trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
        >>> data = torch.utils.data.DataLoader(torch.randn(20) + 3.0, batch_size=10)
        >>> trainer.fit(module, train_dataloaders=data)
        >>> trainer.global_step
        2
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        loss: ELBO | None = None,
        lr: float = 1e-3,
        optimizer: OptimizerFactory | None = None,
        example_batch: Tensor | Sequence[Tensor] | None = None,
    ) -> None:
        if not callable(model) or not callable(guide):
            raise TypeError("model and guide must be callables")
        loss = Trace_ELBO() if loss is None else loss
        if not hasattr(loss, "differentiable_loss"):
            raise TypeError(
                f"loss must be a Pyro ELBO with differentiable_loss, got {type(loss).__name__}"
            )
        super().__init__(lr, optimizer)
        # Modules are registered (their parameters trained, synchronized and saved),
        # including the module behind a bound method such as ``vae.model``.
        owners = [getattr(f, "__self__", None) for f in (model, guide)]
        owners = [o for o in owners if isinstance(o, nn.Module)]
        self.owners = nn.ModuleList(list({id(o): o for o in owners}.values()))
        self.model = model
        self.guide = guide
        self.elbo = loss
        self.example_batch = example_batch
        self._warmed_up = False

    @staticmethod
    def _arguments(batch: Tensor | Sequence[Tensor]) -> tuple:
        return tuple(batch) if isinstance(batch, list | tuple) else (batch,)

    def loss(self, batch: Tensor | Sequence[Tensor]) -> Tensor:
        """The differentiable negative ELBO estimate of one minibatch."""
        return self.elbo.differentiable_loss(self.model, self.guide, *self._arguments(batch))

    def _warm_up_batch(self) -> Tensor | Sequence[Tensor]:
        if self.example_batch is not None:
            return self.example_batch
        source = getattr(getattr(self.trainer, "fit_loop", None), "_data_source", None)
        if source is None or not source.is_defined():
            raise RuntimeError(
                "SVIModule needs one minibatch to create the guide's parameters before "
                "training: pass example_batch=, or train with training data"
            )
        return next(iter(source.dataloader()))

    def setup(self, stage: str) -> None:
        if self._warmed_up or stage != "fit":
            return
        batch = self._warm_up_batch()
        with poutine.trace(param_only=True) as capture:
            self.loss(batch)
        own = {id(p) for p in self.parameters()}
        outside = [
            name
            for name, site in capture.trace.nodes.items()
            if id(site["value"].unconstrained()) not in own
        ]
        if outside:
            raise TypeError(
                f"the parameters {outside} are not parameters of an nn.Module of this "
                "SVIModule (plain pyro.param sites, or pyro.module calls on modules that "
                "are not the model or the guide): data-parallel training and "
                "checkpoints could not see them. Hold them in a PyroModule or an "
                "nn.Module passed as model or guide (a stale entry of the Pyro "
                "parameter store has the same effect: pyro.clear_param_store())"
            )
        self._warmed_up = True

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self._update(loss, batch_idx)
        self.log("train_elbo", -loss.detach(), prog_bar=True, batch_size=1)
        return loss.detach()

    def validation_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            loss = self.elbo.loss(self.model, self.guide, *self._arguments(batch))
        self.log("validation_elbo", -float(loss), prog_bar=True, batch_size=1, sync_dist=True)
