"""Coupling flows: ``x_A = z_A``, ``x_B = h(z_B; g(z_A[, context]))``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pyro_nf.nn.mlp import MLP
from pyro_nf.transforms.base import FlowTransform, broadcast_context
from pyro_nf.transforms.coupling_functions import CouplingFunction
from pyro_nf.transforms.coupling_functions import coupling_function as make_coupling_function

__all__ = ["Coupling", "half_mask"]


def half_mask(dim: int, first_half: bool = True) -> Tensor:
    """A boolean mask that marks the first ``ceil(dim / 2)`` entries (or the rest).

    ``half_mask(5)`` is ``[T, T, T, F, F]``; ``half_mask(5, first_half=False)`` is its
    complement. Alternating the two between layers gives the reference text's double
    layer, in which each half is transformed once.
    """
    mask = torch.arange(dim) < (dim + 1) // 2
    return mask if first_half else ~mask


class Coupling(FlowTransform):
    r"""The general coupling layer of the reference text.

    .. math::
        x_A = z_A, \qquad x_B = h\big(z_B;\ g(z_A[, c])\big), \qquad
        \log\left|\det \frac{\partial x}{\partial z}\right|
            = \sum_{i \in B} \log \left|\frac{\partial h}{\partial z_i}\right|

    ``A`` is the set of entries where ``mask`` is true (passed through and fed to the
    conditioner), ``B`` the rest. ``h`` is any :class:`CouplingFunction` (affine gives
    real NVP, additive gives NICE, a rational-quadratic spline gives a spline coupling
    flow) and ``g`` any module mapping ``(..., |A|)`` (and a context ``(..., C)``) to
    ``(..., |B| * h.num_params)``.

    Direction: z -> x (``_call``, sampling) and x -> z (``_inverse``, density) are both
    a single pass of the conditioner, since ``z_A = x_A``.

    Arguments:
        mask: boolean tensor of shape ``(D,)``, true on the conditioning part A.
        coupling_function: ``h``, an instance or ``"affine"``, ``"additive"``, ``"spline"``.
        conditioner: ``g``; by default an :class:`~pyro_nf.nn.MLP` with ``hidden_dims``.
        hidden_dims: hidden sizes of the default conditioner.
        context_dim: size of the optional context vector (0: unconditional).
        activation: the default conditioner's activation.
        final_multiplier: the default conditioner's final weights are multiplied by it
            in the forward pass and start divided by it, so an Adam step moves the
            layer's output that many times as far (:class:`~pyro_nf.nn.MLP`).

    References:
        Density estimation using Real NVP (Dinh et al., 2017), arXiv:1605.08803.

    Example:
        >>> layer = Coupling(half_mask(4), "affine", hidden_dims=(16,))
        >>> z = torch.randn(10, 4)
        >>> x = layer(z)
        >>> torch.allclose(layer.inv(x), z), layer.log_abs_det_jacobian(z, x).shape
        (True, torch.Size([10]))
    """

    def __init__(
        self,
        mask: Tensor,
        coupling_function: str | CouplingFunction = "affine",
        conditioner: nn.Module | None = None,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str = "relu",
        final_multiplier: float = 1.0,
    ) -> None:
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.dim() != 1:
            raise ValueError(f"mask must be one-dimensional, got shape {tuple(mask.shape)}")
        dim = mask.numel()
        identity_size = int(mask.sum())
        if identity_size in (0, dim):
            raise ValueError(
                f"a coupling layer needs both parts non-empty, got a mask with {identity_size} "
                f"of {dim} entries set (a 1-dimensional input cannot be coupled; use an "
                "autoregressive or continuous flow)"
            )
        super().__init__(dim, context_dim)
        self.coupling_function = make_coupling_function(coupling_function)
        self.register_buffer("mask", mask)
        self.register_buffer("identity_index", torch.nonzero(mask).squeeze(-1))
        self.register_buffer("transform_index", torch.nonzero(~mask).squeeze(-1))
        order = torch.cat([self.identity_index, self.transform_index])
        self.register_buffer("merge_index", torch.argsort(order))
        self._contiguous_split = _split_layout(mask)
        num_out = (dim - identity_size) * self.coupling_function.num_params
        self.conditioner = conditioner or MLP(
            identity_size,
            num_out,
            hidden_dims,
            context_dim=context_dim,
            activation=activation,
            final_multiplier=final_multiplier,
        )

    def _split(self, value: Tensor) -> tuple[Tensor, Tensor]:
        if self._contiguous_split == "identity_first":
            size = self.identity_index.numel()
            return value[..., :size], value[..., size:]
        if self._contiguous_split == "transform_first":
            size = self.transform_index.numel()
            return value[..., size:], value[..., :size]
        return value[..., self.identity_index], value[..., self.transform_index]

    def _merge(self, identity_part: Tensor, transformed_part: Tensor) -> Tensor:
        if self._contiguous_split == "identity_first":
            return torch.cat([identity_part, transformed_part], dim=-1)
        if self._contiguous_split == "transform_first":
            return torch.cat([transformed_part, identity_part], dim=-1)
        return torch.cat([identity_part, transformed_part], dim=-1)[..., self.merge_index]

    def _params(self, identity_part: Tensor, context: Tensor | None) -> Tensor:
        params = self.conditioner(identity_part, context)
        # Parameter-major layout: each parameter of h is a contiguous block of outputs.
        return params.unflatten(-1, (-1, self.transform_index.numel())).transpose(-1, -2)

    def _pass(self, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        value, context = broadcast_context(value, context)
        identity_part, part = self._split(value)
        params = self._params(identity_part, context)
        h = self.coupling_function
        output, log_derivative = h.inverse(part, params) if inverse else h.forward(part, params)
        return self._merge(identity_part, output), log_derivative.sum(-1)

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._pass(z, context, inverse=False)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._pass(x, context, inverse=True)

    def extra_repr(self) -> str:
        mask = "".join("1" if kept else "0" for kept in self.mask.tolist())
        text = f"{super().extra_repr()}, coupling_function={self.coupling_function!r}"
        hidden = getattr(self.conditioner, "hidden_dims", None)
        text += f", mask={mask}" + ("" if hidden is None else f", hidden={hidden}")
        return text


def _split_layout(mask: Tensor) -> str:
    """``identity_first`` / ``transform_first`` when the split is two contiguous blocks."""
    size = int(mask.sum())
    if bool(mask[:size].all()):
        return "identity_first"
    if bool(mask[-size:].all()):
        return "transform_first"
    return "general"
