"""A fully connected conditioner network with an optional context input."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_nf._validation import concat_context, integer, layer_sizes, positive_number

__all__ = ["MLP", "ScaledLinear", "activate_fresh", "activation_module"]


def activation_module(activation: str | Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A factory of activation modules from a name (``"relu"``, ``"tanh"``, ...) or a class."""
    if callable(activation) and not isinstance(activation, str):
        return activation
    registry: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "elu": nn.ELU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "softplus": nn.Softplus,
        "leaky_relu": nn.LeakyReLU,
    }
    if activation not in registry:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(registry)}")
    return registry[activation]


def activate_fresh(activation: nn.Module, pre_activation: Tensor) -> Tensor:
    """``activation(pre_activation)`` for a pre-activation nobody else reads.

    ``pre_activation`` must be the fresh output of a linear layer, whose backward does
    not read its output: a ReLU then overwrites it in place, with no activation-sized
    copy (3-4 % of a coupling flow's pass at batch 4096). Other activations are called
    as they are.

    Example:
        >>> activate_fresh(nn.ReLU(), torch.tensor([-1.0, 2.0]))
        tensor([0., 2.])
    """
    if type(activation) is nn.ReLU:
        return torch.relu_(pre_activation)
    return activation(pre_activation)


class ScaledLinear(nn.Linear):
    r"""A linear layer whose map uses the weight :math:`m W` for a constant :math:`m`.

    ``weight_multiplier`` is :math:`m` (1 by default: :class:`torch.nn.Linear`). The
    map is that of the weight :math:`m W`, but an optimizer whose step is about its
    learning rate per entry whatever the gradient's scale (Adam) moves the map
    :math:`m` times as far per step: a learning rate for this layer's weights alone,
    carried by the module (the bias is not scaled). Shapes as :class:`torch.nn.Linear`:
    ``(..., in_features) -> (..., out_features)``.

    Example:
        >>> layer = ScaledLinear(3, 2, weight_multiplier=0.5)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(layer(x), x @ (0.5 * layer.weight).T + layer.bias)
        True
    """

    def __init__(self, in_features: int, out_features: int, weight_multiplier: float = 1.0):
        super().__init__(in_features, out_features)
        self.weight_multiplier = positive_number("weight_multiplier", weight_multiplier)

    @torch.no_grad()
    def start_near_zero(self, scale: float) -> None:
        """Scale the map of PyTorch's initial weights by ``scale`` and zero the bias.

        The applied weight :math:`m W` becomes ``scale`` times PyTorch's initial one,
        whatever :math:`m`: the stored :math:`W` is multiplied by ``scale / m``, so a
        seed builds the same map for every multiplier (to the bit when :math:`m` is a
        power of two). Conditioners call it on their last layer, so the flow layer
        they parametrize starts near the identity.
        """
        self.weight.mul_(scale / self.weight_multiplier)
        self.bias.zero_()

    def forward(self, inputs: Tensor) -> Tensor:
        if self.weight_multiplier == 1.0:
            return F.linear(inputs, self.weight, self.bias)
        return F.linear(inputs, self.weight * self.weight_multiplier, self.bias)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.weight_multiplier != 1.0:
            text += f", weight_multiplier={self.weight_multiplier:g}"
        return text


class MLP(nn.Module):
    """A multilayer perceptron ``g(u[, c])`` used as the conditioner of a coupling layer.

    The input ``u`` has shape ``(..., in_features)``; an optional context ``c`` of shape
    ``(..., context_dim)`` is broadcast against it and concatenated. The output has shape
    ``(..., out_features)``. The last layer starts with weights scaled by
    ``final_init_scale`` and a zero bias, so the network's output starts close to zero
    and a coupling layer built on it starts close to the identity, while every
    parameter still receives a gradient. ``final_multiplier`` :math:`m` (1 by default)
    makes the last layer a :class:`ScaledLinear`: its map uses the weight :math:`m W`,
    stored divided by :math:`m` (the same network at a seed), so an Adam step moves the
    output :math:`m` times as far (as :class:`~pyro_nf.nn.MADE`'s ``final_multiplier``).

    Example:
        >>> net = MLP(3, 8, hidden_dims=(16, 16), context_dim=2)
        >>> net(torch.randn(5, 3), torch.randn(5, 2)).shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str | Callable[[], nn.Module] = "relu",
        final_init_scale: float = 1e-2,
        final_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        in_features = integer("in_features", in_features, minimum=0)
        out_features = integer("out_features", out_features)
        context_dim = integer("context_dim", context_dim, minimum=0)
        hidden_dims = layer_sizes("hidden_dims", hidden_dims)
        if in_features + context_dim < 1:
            raise ValueError(
                f"MLP needs at least one input and one output, got in_features={in_features}, "
                f"context_dim={context_dim}, out_features={out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.hidden_dims = hidden_dims
        self.context_dim = context_dim
        make_activation = activation_module(activation)
        sizes = [in_features + context_dim, *hidden_dims, out_features]
        layers: list[nn.Module] = []
        final_multiplier = positive_number("final_multiplier", final_multiplier)
        for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True):
            layers += [nn.Linear(n_in, n_out), make_activation()]
        final = ScaledLinear(sizes[-2], sizes[-1], final_multiplier)
        layers.append(final)
        self.network = nn.Sequential(*layers)
        final.start_near_zero(final_init_scale)

    @property
    def output(self) -> ScaledLinear:
        """The last layer (as :class:`~pyro_nf.nn.MADE`'s ``output``)."""
        return self.network[-1]

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        h = concat_context(inputs, context)
        for layer in self.network:
            h = layer(h) if isinstance(layer, nn.Linear) else activate_fresh(layer, h)
        return h
