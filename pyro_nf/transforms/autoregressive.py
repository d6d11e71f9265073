"""Autoregressive flows: masked autoregressive (MAF) and inverse autoregressive (IAF).

Both apply a coupling function ``h`` elementwise with parameters from a :class:`MADE`
conditioner; they differ in what the conditioner reads. MAF reads the data ``x``, so
density evaluation (x -> z) is one pass and sampling is sequential; IAF reads the base
variable ``z``, so sampling (z -> x) is one pass and the density of a point that was not
sampled by the flow itself is sequential.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from pyro_nf.nn.made import MADE
from pyro_nf.transforms.base import FlowTransform, broadcast_context, describe_order
from pyro_nf.transforms.coupling_functions import CouplingFunction
from pyro_nf.transforms.coupling_functions import coupling_function as make_coupling_function

__all__ = ["Autoregressive", "MaskedAutoregressive", "InverseAutoregressive"]


class Autoregressive(FlowTransform):
    r"""The structure shared by :class:`MaskedAutoregressive` and :class:`InverseAutoregressive`.

    With ``u`` the variable the conditioner reads and ``v`` the other one,
    ``v_d`` is ``h`` (or ``h^{-1}``) of ``u_d`` with parameters ``g_d(u_{<d})``. The
    *parallel* pass goes from ``u`` to ``v`` in one conditioner pass; the *sequential*
    pass goes from ``v`` to ``u`` in D passes, one per position of the order, since
    the parameters of position ``i`` need the ``u`` of the positions before it. The
    sequential pass is one loop for both flows (MAF sampling, IAF inversion): only the
    direction of ``h`` differs.

    Direction: for MAF (``u = x``) x -> z is the parallel pass and z -> x the
    sequential one; for IAF (``u = z``) z -> x is parallel and x -> z sequential.

    Arguments:
        dim: the event size D.
        coupling_function: ``h``, an instance or ``"affine"``, ``"additive"``, ``"spline"``.
        hidden_dims: hidden sizes of the default :class:`~pyro_nf.nn.MADE` conditioner.
        context_dim: size of the optional context vector (0: unconditional).
        order: the autoregressive order of the default conditioner: ``"natural"``,
            ``"reverse"``, ``"random"`` (from ``seed``) or an explicit permutation.
        seed: seed of a random order.
        activation: the conditioner's activation.
        residual: residual hidden layers in the conditioner.
        conditioner: a :class:`~pyro_nf.nn.MADE` to use instead of the default one; it
            must have ``dim``, ``context_dim`` and ``h.num_params`` matching.
        final_multiplier: the default conditioner's ``final_multiplier`` (see
            :class:`~pyro_nf.nn.MADE`: it changes Adam's step, not the initial map).

    Example:
        >>> maf_layer = MaskedAutoregressive(4, "additive", hidden_dims=(16,))
        >>> x = torch.randn(3, 4)
        >>> z, log_det = maf_layer.inverse_and_log_det(x)  # parallel
        >>> x_again, _ = maf_layer.forward_and_log_det(z)  # sequential: 4 passes
        >>> torch.allclose(x_again, x, atol=1e-6), log_det.shape
        (True, torch.Size([3]))
    """

    autoregressive = True
    _conditioner_reads_x: bool

    def __init__(
        self,
        dim: int,
        coupling_function: str | CouplingFunction = "affine",
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: str | Sequence[int] | Tensor = "natural",
        seed: int = 0,
        activation: str = "relu",
        residual: bool = False,
        conditioner: MADE | None = None,
        final_multiplier: float = 1.0,
    ) -> None:
        super().__init__(dim, context_dim)
        self.coupling_function = make_coupling_function(coupling_function)
        num_params = self.coupling_function.num_params
        if conditioner is None:
            conditioner = MADE(
                dim,
                num_params,
                hidden_dims,
                context_dim=context_dim,
                order=order,
                seed=seed,
                activation=activation,
                residual=residual,
                final_multiplier=final_multiplier,
            )
        elif final_multiplier != 1.0:
            raise ValueError(
                "final_multiplier applies to the default conditioner; build the MADE "
                f"with final_multiplier={final_multiplier!r} instead"
            )
        elif not isinstance(conditioner, MADE):
            raise TypeError(f"conditioner must be a MADE, got {type(conditioner).__name__}")
        expected = (dim, context_dim, num_params)
        given = (conditioner.dim, conditioner.context_dim, conditioner.num_params)
        if given != expected:
            raise ValueError(
                f"the conditioner's (dim, context_dim, num_params) must be {expected}, got {given}"
            )
        self.conditioner = conditioner

    def _parallel_pass(
        self, u: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """One conditioner pass from the variable it reads, ``u``, to the other one."""
        u, context = broadcast_context(u, context)
        params = self.conditioner(u, context)
        h = self.coupling_function
        v, log_derivative = h.inverse(u, params) if inverse else h.forward(u, params)
        return v, log_derivative.sum(-1)

    def _sequential_pass(
        self, v: Tensor, context: Tensor | None, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """D passes from ``v`` to the variable the conditioner reads, ``u``.

        Pass ``i`` makes position ``order[i]`` final (it needs only earlier positions),
        and its log-derivative is collected at once, so no extra pass is needed.
        """
        v, context = broadcast_context(v, context)
        batch_shape = v.shape[:-1]
        flat = v.reshape(-1, self.dim)
        if context is not None:
            context = context.reshape(-1, self.context_dim)
        made = self.conditioner
        steps = made.steps(context, flat)
        h_pass = self.coupling_function.inverse if inverse else self.coupling_function.forward
        v_in_order = flat.index_select(-1, made.order)
        outputs: list[Tensor] = []
        log_derivatives: list[Tensor] = []
        for i in range(self.dim):
            params = steps.params(i).unsqueeze(-2)
            u_i, log_derivative = h_pass(v_in_order[:, i : i + 1], params)
            outputs.append(u_i)
            log_derivatives.append(log_derivative)
            if i < self.dim - 1:
                steps.feed(i, u_i.squeeze(-1))
        u = torch.cat(outputs, dim=-1).index_select(-1, made.rank)
        log_det = torch.cat(log_derivatives, dim=-1).sum(-1)
        return u.reshape(v.shape), log_det.reshape(batch_shape)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self._conditioner_reads_x:
            return self._sequential_pass(z, context, inverse=False)
        return self._parallel_pass(z, context, inverse=False)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self._conditioner_reads_x:
            return self._parallel_pass(x, context, inverse=True)
        return self._sequential_pass(x, context, inverse=True)

    def extra_repr(self) -> str:
        made = self.conditioner
        return (
            f"{super().extra_repr()}, coupling_function={self.coupling_function!r}, "
            f"hidden={made.hidden_dims}, order={describe_order(made.order)}"
            + (", residual=True" if made.residual else "")
        )


class MaskedAutoregressive(Autoregressive):
    r"""Masked autoregressive flow (MAF) layer: the conditioner reads the data ``x``.

    .. math::
        x_d = h\big(z_d;\ g_d(x_{<d}[, c])\big), \qquad
        z_d = h^{-1}\big(x_d;\ g_d(x_{<d}[, c])\big), \qquad
        \log\left|\det \frac{\partial x}{\partial z}\right|
            = \sum_d \log \left|\frac{\partial h}{\partial z_d}\right|

    where ``<d`` means "before ``d`` in the order" and ``g`` is a
    :class:`~pyro_nf.nn.MADE`. The Jacobian is triangular in the order.

    Direction: x -> z (``_inverse``, density) is one conditioner pass (the cheap
    direction, ``cheap_inverse = True``); z -> x (``_call``, sampling) is D sequential
    passes, each a whole-batch tensor operation.

    Shapes: ``z``, ``x`` ``(..., D)``; context ``(..., C)``; log-det ``(...)``.

    Arguments: as for :class:`Autoregressive`.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        arXiv:1705.07057.

    Example:
        >>> layer = MaskedAutoregressive(3, "affine", hidden_dims=(16,))
        >>> x = torch.randn(10, 3)
        >>> z = layer.inv(x)
        >>> torch.allclose(layer(z), x, atol=1e-6), layer.log_abs_det_jacobian(z, x).shape
        (True, torch.Size([10]))
    """

    cheap_inverse = True
    _conditioner_reads_x = True


class InverseAutoregressive(Autoregressive):
    r"""Inverse autoregressive flow (IAF) layer: the conditioner reads the base variable ``z``.

    .. math::
        x_d = h\big(z_d;\ g_d(z_{<d}[, c])\big), \qquad
        z_d = h^{-1}\big(x_d;\ g_d(z_{<d}[, c])\big), \qquad
        \log\left|\det \frac{\partial x}{\partial z}\right|
            = \sum_d \log \left|\frac{\partial h}{\partial z_d}\right|

    where ``<d`` means "before ``d`` in the order" and ``g`` is a
    :class:`~pyro_nf.nn.MADE`. Pyro's ``AffineAutoregressive`` is this transform with
    an affine ``h``.

    Direction: z -> x (``_call``, sampling) is one conditioner pass (the cheap
    direction); x -> z (``_inverse``, density of points not drawn from the flow) is D
    sequential passes. The cache of the last pair makes the variational pattern
    ``x = q.rsample(); q.log_prob(x)`` a single pass.

    Shapes: ``z``, ``x`` ``(..., D)``; context ``(..., C)``; log-det ``(...)``.

    Arguments: as for :class:`Autoregressive`.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al.,
        2016), arXiv:1606.04934.

    Example:
        >>> layer = InverseAutoregressive(3, "spline", hidden_dims=(16,), context_dim=2)
        >>> bound = layer.condition(torch.randn(10, 2))
        >>> z = torch.randn(10, 3)
        >>> x = bound(z)
        >>> torch.allclose(bound.inv(x), z), bound.log_abs_det_jacobian(z, x).shape
        (True, torch.Size([10]))
    """

    _conditioner_reads_x = False
