"""MADE: a masked autoregressive conditioner network with an optional context input."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_nf._validation import (
    check_context,
    concat_context,
    integer,
    layer_sizes,
    positive_number,
)
from pyro_nf.nn.mlp import ScaledLinear, activate_fresh, activation_module

__all__ = ["MADE", "MaskedLinear", "AutoregressiveSteps", "autoregressive_order"]


def autoregressive_order(order: str | Sequence[int] | Tensor, dim: int, seed: int = 0) -> Tensor:
    """The order of the variables as a permutation of ``range(dim)`` (a long tensor).

    ``order[i]`` is the variable at position ``i`` of the autoregressive order: it may
    depend on ``order[:i]`` only.

    Arguments:
        order: ``"natural"`` (0, 1, ..., D-1; ``"identity"`` is an alias), ``"reverse"``
            (D-1, ..., 0; ``"reversed"`` is an alias), ``"random"`` (drawn from a
            generator seeded with ``seed``) or an explicit permutation.
        dim: the number of variables D.
        seed: seed of the random order.

    Example:
        >>> autoregressive_order("reverse", 3)
        tensor([2, 1, 0])
    """
    if isinstance(order, str):
        if order in ("natural", "identity"):
            return torch.arange(dim)
        if order in ("reverse", "reversed"):
            return torch.arange(dim - 1, -1, -1)
        if order == "random":
            return torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        raise ValueError(
            f"unknown order {order!r}; expected 'natural', 'reverse', 'random' or a permutation"
        )
    permutation = torch.as_tensor(order)
    if (
        permutation.dim() != 1
        or permutation.dtype.is_floating_point
        or permutation.numel() != dim
        or not torch.equal(torch.sort(permutation.long()).values, torch.arange(dim))
    ):
        raise ValueError(
            f"expected the order to be a permutation of range({dim}), got {permutation.tolist()}"
        )
    return permutation.long()


def _linear(inputs: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear``, also for a zero-width input (the first position of the order).

    With no input feature the output is the bias, copied to the batch. TorchScript's
    derivative of ``linear`` (``JitTrace_ELBO``) reshapes the input to ``(-1, 0)`` and
    fails, so that case never reaches it; the copy keeps the result from aliasing the
    parameter.
    """
    if weight.shape[-1] == 0:
        return bias.expand(*inputs.shape[:-1], bias.shape[-1]).clone()
    return F.linear(inputs, weight, bias)


def _hidden_degrees(width: int, dim: int, lowest: int) -> Tensor:
    """Sorted degrees of ``width`` hidden units, spread evenly over ``[lowest, dim - 2]``.

    A unit of degree ``k`` may see the inputs at positions ``<= k`` of the order; degree
    ``-1`` sees only the context (or nothing: a learned constant). Sorting matters for
    the sequential evaluation: the units needed by position ``i`` are a prefix.
    """
    count = dim - 1 - lowest
    return lowest + torch.div(torch.arange(width) * count, width, rounding_mode="floor")


class MaskedLinear(ScaledLinear):
    r"""A linear layer whose weight is multiplied by a fixed 0/1 mask: :math:`y = m (W \odot M) u + b`.

    The mask is a 0/1 buffer of the weight's dtype (it follows ``.to(device)`` and
    ``.double()``; multiplying by a boolean mask is several times slower), applied once
    per call, not per sample. ``weight_multiplier`` is the constant :math:`m` of
    :class:`~pyro_nf.nn.ScaledLinear` (1 by default): an Adam step moves the map
    :math:`m` times as far (see :class:`MADE`'s ``final_multiplier``).

    Example:
        >>> layer = MaskedLinear(2, 2, torch.tensor([[True, False], [True, True]]))
        >>> bool(layer.masked_weight[0, 1] == 0)
        True
    """

    def __init__(
        self, in_features: int, out_features: int, mask: Tensor, weight_multiplier: float = 1.0
    ) -> None:
        super().__init__(in_features, out_features, weight_multiplier)
        if mask.shape != (out_features, in_features):
            raise ValueError(
                f"expected a mask of shape {(out_features, in_features)}, got {tuple(mask.shape)}"
            )
        self.register_buffer("mask", mask.to(self.weight.dtype))

    @property
    def masked_weight(self) -> Tensor:
        """The weight the layer applies, :math:`m (W \\odot M)`."""
        if self.weight_multiplier == 1.0:
            return self.weight * self.mask
        return self.weight * (self.mask * self.weight_multiplier)

    def forward(self, inputs: Tensor) -> Tensor:
        return F.linear(inputs, self.masked_weight, self.bias)


class MADE(nn.Module):
    r"""Masked autoencoder for distribution estimation: an autoregressive conditioner.

    Maps ``u`` of shape ``(..., D)`` (and a context ``c`` of shape ``(..., C)``) to
    parameters ``theta`` of shape ``(..., D, num_params)`` such that the parameters of
    the variable at position ``i`` of the order depend only on the variables before it:

    .. math::
        \theta_{\pi(i)} = g_{\pi(i)}\big(u_{\pi(1)}, \dots, u_{\pi(i-1)};\ c\big)

    where :math:`\pi` is ``order``. Each hidden unit gets a degree ``k`` and sees only
    the inputs at positions ``<= k`` (and the whole context); an output at position
    ``i`` sees only units of degree ``< i``. Units of degree ``-1`` (present with a
    context, or when ``D = 1``) see the context alone, so every output may depend on
    the context; for ``D = 1`` without a context the output is a learned constant.

    The final layer starts with weights scaled by ``final_init_scale`` and a zero bias,
    so a flow built on a fresh MADE starts close to the identity. Its weights enter
    multiplied by ``final_multiplier`` (1 by default) and start divided by it, so the
    multiplier does not change the network a seed builds, only how far an Adam step
    moves it: Adam moves every weight by about its learning rate whatever the
    gradient's scale, so a step moves each output by about
    ``lr * final_multiplier * sum_j |h_j|`` over the last hidden layer's units ``h``
    (of the order of 0.3 at lr 1e-2 with 64 units and no multiplier).

    :meth:`steps` evaluates the network one position at a time for the sequential
    direction of an autoregressive flow, computing at position ``i`` only the units
    that position needs (a prefix of each layer, since degrees are sorted).

    Arguments:
        dim: the number of variables D.
        num_params: parameters per variable (2 for affine, ``3K - 1`` for a K-bin spline).
        hidden_dims: sizes of the hidden layers (any number, also none; any size).
        context_dim: the context size C (0: no context).
        order: ``"natural"``, ``"reverse"``, ``"random"`` or an explicit permutation,
            see :func:`autoregressive_order`.
        seed: seed of a random order.
        activation: the hidden activation, a name or an ``nn.Module`` class.
        residual: add each hidden layer after the first to its input
            (:math:`h \leftarrow h + \sigma(W h + b)`); needs equal hidden sizes.
        final_init_scale: the scale of the final layer's initial weights.
        final_multiplier: the constant the final layer's weights are multiplied by in
            the forward pass (a positive number; see above).

    References:
        MADE: Masked Autoencoder for Distribution Estimation (Germain et al., 2015),
        arXiv:1502.03509.

    Example:
        >>> made = MADE(3, num_params=2, hidden_dims=(16, 16), order="reverse")
        >>> made(torch.randn(5, 3)).shape
        torch.Size([5, 3, 2])
    """

    def __init__(
        self,
        dim: int,
        num_params: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        order: str | Sequence[int] | Tensor = "natural",
        seed: int = 0,
        activation: str | Callable[[], nn.Module] = "relu",
        residual: bool = False,
        final_init_scale: float = 1e-2,
        final_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        dim = integer("dim", dim)
        num_params = integer("num_params", num_params)
        context_dim = integer("context_dim", context_dim, minimum=0)
        hidden_dims = layer_sizes("hidden_dims", hidden_dims)
        if residual and len(set(hidden_dims)) > 1:
            raise ValueError(f"residual=True needs equal hidden sizes, got {hidden_dims!r}")
        self.dim = dim
        self.num_params = num_params
        self.context_dim = context_dim
        self.hidden_dims = hidden_dims
        self.residual = residual
        order_tensor = autoregressive_order(order, dim, seed)
        self.register_buffer("order", order_tensor)
        self.register_buffer("rank", torch.argsort(order_tensor))

        input_degrees = self.rank
        lowest = -1 if context_dim > 0 or dim == 1 else 0
        degrees = [_hidden_degrees(width, dim, lowest) for width in hidden_dims]
        # Number of units of degree < i in each layer: what position i needs.
        self._prefix_sizes = [
            torch.searchsorted(d, torch.arange(dim), right=False).tolist() for d in degrees
        ]
        context_columns = torch.ones(1, context_dim, dtype=torch.bool)

        make_activation = activation_module(activation)
        self.layers = nn.ModuleList()
        self.activations = nn.ModuleList()
        previous = input_degrees
        for i, current in enumerate(degrees):
            mask = current.unsqueeze(-1) >= previous.unsqueeze(0)
            if i == 0:
                mask = torch.cat([mask, context_columns.expand(len(current), -1)], dim=-1)
            self.layers.append(MaskedLinear(mask.shape[1], mask.shape[0], mask))
            self.activations.append(make_activation())
            previous = current
        output_degrees = input_degrees.repeat_interleave(num_params)
        mask = output_degrees.unsqueeze(-1) > previous.unsqueeze(0)
        if not degrees:
            mask = torch.cat([mask, context_columns.expand(len(output_degrees), -1)], dim=-1)
        final_multiplier = positive_number("final_multiplier", final_multiplier)
        self.output = MaskedLinear(mask.shape[1], mask.shape[0], mask, final_multiplier)
        self.output.start_near_zero(final_init_scale)

    def _check(self, inputs: Tensor, context: Tensor | None) -> None:
        if inputs.dim() == 0 or inputs.shape[-1] != self.dim:
            raise ValueError(
                f"MADE: expected inputs with last dimension {self.dim}, "
                f"got shape {tuple(inputs.shape)}"
            )
        check_context("MADE", context, self.context_dim)

    def _hidden(self, h: Tensor, index: int, weight: Tensor, bias: Tensor) -> Tensor:
        a = activate_fresh(self.activations[index], _linear(h, weight, bias))
        return h + a if self.residual and index > 0 else a

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """Parameters of shape ``(..., D, num_params)`` for inputs ``(..., D)``."""
        self._check(inputs, context)
        h = concat_context(inputs, context)
        for index, layer in enumerate(self.layers):
            h = self._hidden(h, index, layer.masked_weight, layer.bias)
        return self.output(h).unflatten(-1, (self.dim, self.num_params))

    def steps(self, context: Tensor | None, like: Tensor) -> AutoregressiveSteps:
        """A one-position-at-a-time evaluator for a batch shaped like ``like`` ``(B, D)``."""
        self._check(like, context)
        return AutoregressiveSteps(self, context, like)

    def extra_repr(self) -> str:
        text = f"dim={self.dim}, num_params={self.num_params}"
        if self.context_dim:
            text += f", context_dim={self.context_dim}"
        if self.output.weight_multiplier != 1.0:
            text += f", final_multiplier={self.output.weight_multiplier:g}"
        return text + (", residual=True" if self.residual else "")


class AutoregressiveSteps:
    """Evaluates a :class:`MADE` position by position, for the sequential direction.

    For ``i = 0, ..., D-1``: :meth:`params` gives the parameters ``(B, num_params)`` of
    the variable ``order[i]`` from the values fed so far, then :meth:`feed` gives it the
    value of that variable. This equals the full network's output (the masks make the
    unused units irrelevant) at a fraction of its cost:

    - the masked weights are formed once, not once per position;
    - the first layer's pre-activation is kept and updated by one rank-one product per
      fed value (and the context's share is computed once);
    - position ``i`` evaluates only the hidden units of degree ``< i`` (a prefix of each
      layer, since degrees are sorted) and only its own ``num_params`` outputs.

    Arguments:
        made: the network.
        context: ``(B, C)`` or ``None``.
        like: a ``(B, D)`` tensor giving the batch size, dtype and device.
    """

    def __init__(self, made: MADE, context: Tensor | None, like: Tensor) -> None:
        if like.dim() != 2:
            raise ValueError(f"expected a (batch, {made.dim}) tensor, got {tuple(like.shape)}")
        self.made = made
        dim, batch = made.dim, like.shape[0]
        first = made.layers[0] if made.layers else made.output
        weight = first.masked_weight
        # Row r: the weights from the input at position r of the order.
        self.input_rows = weight[:, :dim].index_select(1, made.order).t()
        if context is not None:
            self.pre_activation = F.linear(context, weight[:, dim:], first.bias)
        else:
            self.pre_activation = first.bias.expand(batch, -1)
        # Without autograd the pre-activation can be updated in place (a fresh copy of
        # the batch-sized array per position was a quarter of the loop's time). It must
        # be a copy of its own: without a context it is the bias expanded to the batch,
        # and for a batch of one ``contiguous()`` would return a view of the bias itself,
        # so the in-place updates would write into the network's parameters.
        self.in_place = not torch.is_grad_enabled()
        if self.in_place:
            self.pre_activation = self.pre_activation.clone(memory_format=torch.contiguous_format)
        self.hidden = [(layer.masked_weight, layer.bias) for layer in list(made.layers)[1:]]
        if made.layers:
            width = made.output.weight.shape[-1]
            self.output_weight = made.output.masked_weight.view(dim, -1, width)[made.order]
            self.output_bias = made.output.bias.view(dim, -1)[made.order]

    def params(self, i: int) -> Tensor:
        """Parameters ``(B, num_params)`` of the variable at position ``i`` of the order."""
        made = self.made
        if not made.layers:
            chosen = made.order[i : i + 1]
            return self.pre_activation.view(-1, made.dim, made.num_params).index_select(1, chosen)[
                :, 0
            ]
        sizes = [prefix[i] for prefix in made._prefix_sizes]
        h = made.activations[0](self.pre_activation[:, : sizes[0]])
        for index, (weight, bias) in enumerate(self.hidden, start=1):
            size, previous = sizes[index], sizes[index - 1]
            h = made._hidden(h, index, weight[:size, :previous], bias[:size])
        return _linear(h, self.output_weight[i][:, : sizes[-1]], self.output_bias[i])

    def feed(self, i: int, value: Tensor) -> None:
        """Give the value ``(B,)`` of the variable at position ``i`` of the order."""
        column, row = value.unsqueeze(-1), self.input_rows[i : i + 1]
        if self.in_place:
            self.pre_activation.addmm_(column, row)
        else:
            self.pre_activation = torch.addmm(self.pre_activation, column, row)
