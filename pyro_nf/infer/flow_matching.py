r"""Flow matching: train a continuous flow's vector field by regression, without a solve.

A continuous flow maps the base variable ``z = z(0)`` to the data ``x = z(1)`` along
its ODE (in the solver's time ``s``; the field's own time is ``t = sT``). Maximum
likelihood differentiates through the augmented solve of the state and the trace,
tens of field evaluations per step. Flow matching (Lipman et al., 2023; Liu et al.,
2023, "rectified flow"; Albergo and Vanden-Eijnden, 2023) instead joins each data
point ``x`` to an independent base draw ``z`` by the straight path
``x_s = (1 - s) z + s x``, whose velocity is ``x - z``, and regresses the flow's
velocity on it:

.. math::
    L(w) = \mathbb{E}_{s \sim U(0, 1),\, z \sim p_0,\, x \sim p_{\text{data}}}
    \bigl\| T f(x_s, sT[, c]; w) - (x - z) \bigr\|^2 .

Its minimizer is the marginal velocity :math:`v(y, s) = \mathbb E[x - z \mid x_s = y]`,
whose flow carries :math:`p_0` to the data distribution exactly; the loss needs one
evaluation of the field per point and no ODE solve. The trained flow is an ordinary
:class:`~pyro_nf.transforms.ContinuousFlow`: ``log_prob``, ``sample`` and every Pyro
use are unchanged (they solve the ODE, with the exact or stochastic trace).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyro_nf._validation import check_context
from pyro_nf.flows import Flow
from pyro_nf.infer.data import prepare_batch
from pyro_nf.transforms.base import broadcast_context
from pyro_nf.transforms.continuous import ContinuousFlow

__all__ = [
    "FLOW_MATCHING_REDUCTIONS",
    "flow_matching_batch_loss",
    "flow_matching_block",
    "flow_matching_loss",
]

FLOW_MATCHING_REDUCTIONS = ("mean", "none")


def flow_matching_block(flow: Flow) -> ContinuousFlow:
    """The one :class:`~pyro_nf.transforms.ContinuousFlow` of a flow that flow matching trains.

    Flow matching regresses the velocity of a path from the base to the data, so the
    flow must be that path: a single ODE block between them (``cnf(dim)`` with
    ``num_layers=1`` and ``actnorm=False``; any base).

    Raises:
        TypeError: ``flow`` is not a :class:`~pyro_nf.Flow`.
        ValueError: its layers are not exactly one ``ContinuousFlow``.

    Example:
        >>> flow_matching_block(pyro_nf.cnf(2, hidden_dims=(8,))).dim
        2
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"flow must be a pyro_nf.Flow, got {type(flow).__name__}")
    layers = flow.layers
    if len(layers) != 1 or not isinstance(layers[0], ContinuousFlow):
        names = [type(layer).__name__ for layer in layers]
        raise ValueError(
            "flow matching trains a flow made of one ContinuousFlow block, the path from "
            f"the base to the data (pyro_nf.cnf(dim) with num_layers=1, actnorm=False); "
            f"got layers {names}"
        )
    return layers[0]


def flow_matching_loss(
    flow: Flow,
    x: Tensor,
    context: Tensor | None = None,
    *,
    base_sample: Tensor | None = None,
    time: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""The flow-matching loss of a minibatch ``x`` (see the module docstring).

    .. math::
        \ell_i = \bigl\| T f\bigl((1 - s_i) z_i + s_i x_i,\ s_i T[, c_i]\bigr) -
        (x_i - z_i) \bigr\|^2, \qquad s_i \sim U(0, 1),\ z_i \sim p_0 .

    Direction: the path runs from the base ``z`` (solver time 0) to the data ``x``
    (time 1), the flow's sampling direction z -> x. A gradient step on it costs one
    evaluation of the field and its backward pass per point, against the tens of
    evaluations of an ODE solve per step for the likelihood. Parameters outside the
    field (a Student-t base's ``base_tail``) get no gradient: the flow transports the
    base as it is.

    Arguments:
        flow: a flow of one :class:`~pyro_nf.transforms.ContinuousFlow` block
            (:func:`flow_matching_block`); its field must accept a time per row, shape
            ``x.shape[:-1]``, as :class:`~pyro_nf.nn.ODEDynamics` does.
        x: data of shape ``(..., D)``.
        context: shape ``(..., C)`` for a conditional flow, else None.
        base_sample: the base draws ``z``, shape of ``x`` (default: drawn from the
            flow's base with the global random state).
        time: the solver times ``s`` in ``[0, 1]``, shape ``x.shape[:-1]`` (default:
            uniform draws with the global random state).
        reduction: ``"mean"`` (a scalar, the training loss) or ``"none"`` (one loss per
            row, shape ``x.shape[:-1]``).

    Returns:
        the loss: a scalar, or one per row with ``reduction="none"``.

    Raises:
        ValueError: on a flow that is not one ODE block, on shapes that do not fit, or
            on a field whose output does not have the shape of ``x``.

    Example:
        >>> flow = pyro_nf.cnf(2, hidden_dims=(16, 16))
        >>> loss = flow_matching_loss(flow, torch.randn(64, 2) + 3.0)
        >>> loss.backward()
        >>> flow_matching_loss(flow, torch.randn(64, 2), reduction="none").shape
        torch.Size([64])
    """
    block = flow_matching_block(flow)
    if reduction not in FLOW_MATCHING_REDUCTIONS:
        raise ValueError(f"reduction must be one of {FLOW_MATCHING_REDUCTIONS}, got {reduction!r}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != flow.dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected x of shape (..., {flow.dim}), got {shape}")
    check_context("Flow", context, flow.context_dim)
    x, context = broadcast_context(x, context)
    batch_shape = x.shape[:-1]
    if base_sample is None:
        base_sample = flow.base_distribution(batch_shape).sample()  # no gradient
    elif base_sample.shape != x.shape:
        raise ValueError(
            f"base_sample must have the shape of x, {tuple(x.shape)}, got {tuple(base_sample.shape)}"
        )
    if time is None:
        time = torch.rand(batch_shape, dtype=x.dtype, device=x.device)
    elif time.shape != batch_shape:
        raise ValueError(
            f"time must have the batch shape of x, {tuple(batch_shape)}, got {tuple(time.shape)}"
        )
    s = time.unsqueeze(-1)
    point = (1 - s) * base_sample + s * x
    end_time = block.end_time.to(x)
    field_time = time * end_time
    dynamics = block.dynamics
    field = dynamics(field_time, point) if context is None else dynamics(field_time, point, context)
    if field.shape != x.shape:
        raise ValueError(
            f"the field gave shape {tuple(field.shape)} for points of shape {tuple(x.shape)}: "
            "flow matching calls it with a time per row, shape x.shape[:-1] (as ODEDynamics "
            "takes it)"
        )
    per_row = (end_time * field - (x - base_sample)).pow(2).sum(-1)
    return per_row.mean() if reduction == "mean" else per_row


def flow_matching_batch_loss(flow: Flow, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, int]:
    """The flow-matching loss of one minibatch and its size, the counterpart of
    :func:`~pyro_nf.infer.training.batch_loss` for ``fit(..., objective="flow_matching")``.

    ``batch`` (``x`` or ``(x, context)``) is checked and moved to the flow's device and
    dtype by :func:`~pyro_nf.infer.data.prepare_batch`.

    Example:
        >>> loss, size = flow_matching_batch_loss(pyro_nf.cnf(2, hidden_dims=(8,)), torch.zeros(5, 2))
        >>> loss.shape, size
        (torch.Size([]), 5)
    """
    x, context = prepare_batch(batch, flow.dim, flow.context_dim, flow.base_loc)
    return flow_matching_loss(flow, x, context), x.shape[0]
