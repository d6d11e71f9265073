"""Time-dependent vector fields ``f(t, z[, c])``: the dynamics of neural ODEs and CNFs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pyro_nf._validation import integer, layer_sizes
from pyro_nf.nn.mlp import activation_module

__all__ = ["ConcatSquashLinear", "ODEDynamics"]

DYNAMICS_INITS = ("preserve", "torch")

# The initial mean of a concat-squash gate, sigmoid(a t + b) with PyTorch's init of a
# one-input hyper layer (a, b uniform on [-1, 1]): 1/2 by symmetry.
GATE_MEAN = 0.5


def _activation_gain(activation: str | Callable[[], nn.Module]) -> float:
    """The weight gain that keeps the variance of a layer's input through the activation.

    tanh, relu, leaky_relu: ``torch.nn.init.calculate_gain`` (5/3, sqrt 2, ...);
    softplus: 2 = 1 / softplus'(0); any other activation: 1.
    """
    if activation == "softplus":
        return 2.0
    if isinstance(activation, str) and activation in ("tanh", "relu", "leaky_relu"):
        return nn.init.calculate_gain(activation)
    return 1.0


class ConcatSquashLinear(nn.Module):
    r"""A linear layer whose output is gated and shifted by the time (and a context).

    .. math::
        y = (W u + b) \odot \sigma(a_g t + A_g c + b_g) + a_s t + A_s c

    The input ``u`` has shape ``(..., in_features)``, the time ``t`` is a scalar tensor
    (one time for the batch, as in an ODE solve) or has a batch shape (a time per row,
    as in :func:`~pyro_nf.infer.flow_matching_loss`), and the optional context ``c``
    has shape ``(..., context_dim)``; the output has shape ``(..., out_features)``
    (the batch shapes of ``u``, ``t`` and ``c`` broadcast).

    Arguments:
        in_features: the input size.
        out_features: the output size.
        context_dim: the context size (0: no context).

    References:
        FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        (Grathwohl et al., 2018), arXiv:1810.01367.

    Example:
        >>> layer = ConcatSquashLinear(3, 5, context_dim=2)
        >>> layer(torch.tensor(0.5), torch.randn(4, 3), torch.randn(4, 2)).shape
        torch.Size([4, 5])
        >>> layer(torch.rand(4), torch.randn(4, 3), torch.randn(4, 2)).shape  # a time per row
        torch.Size([4, 5])
    """

    def __init__(self, in_features: int, out_features: int, context_dim: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.context_dim = context_dim
        self.linear = nn.Linear(in_features, out_features)
        # One small network gives the gate's logits and the shift from (t, c).
        self.hyper = nn.Linear(1 + context_dim, 2 * out_features)

    def forward(self, t: Tensor, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        # One time for the batch -> (1,); a time per row, shape (...) -> (..., 1).
        time = t.to(inputs).reshape(1) if t.numel() == 1 else t.to(inputs).unsqueeze(-1)
        if context is None:
            hyper_input = time
        else:
            batch_shape = torch.broadcast_shapes(time.shape[:-1], context.shape[:-1])
            hyper_input = torch.cat(
                [time.expand(batch_shape + (1,)), context.expand(batch_shape + (-1,))], dim=-1
            )
        gate, shift = self.hyper(hyper_input).chunk(2, dim=-1)
        return self.linear(inputs) * torch.sigmoid(gate) + shift


class ODEDynamics(nn.Module):
    r"""A time-dependent vector field ``f(t, z[, c])`` made of concat-squash layers.

    .. math::
        \frac{dz(t)}{dt} = f(z(t), t; w), \qquad
        f = L_K \circ \phi \circ L_{K-1} \circ \dots \circ \phi \circ L_1

    where every :math:`L_k` is a :class:`ConcatSquashLinear` layer (weights modulated
    by the time and the context) and :math:`\phi` a smooth activation (``tanh`` by
    default: an adaptive solver and the trace of the Jacobian both need a smooth
    field). The last layer starts with weights scaled by ``final_init_scale``, so the
    field starts close to zero and an ODE flow built on it starts close to the
    identity, while every parameter still receives a gradient.

    Initialisation of the hidden layers (``init``): with ``"preserve"`` (default) each
    hidden layer passes on the variation of its input. Its weights are drawn
    :math:`W_{ij} \sim \mathcal N(0, (g / \bar\sigma)^2 / n_{in})` with :math:`g`
    the activation's gain (5/3 for tanh as in ``torch.nn.init.calculate_gain``, 2 =
    1/softplus'(0) for softplus, 1 for activations without a listed gain) and :math:`\bar\sigma = 1/2` the gate's mean at
    initialisation; its bias and the time/context shift (:math:`a_s, A_s` and the
    shift's bias) start at zero, the gate at PyTorch's init. With ``"torch"`` every
    layer keeps PyTorch's ``nn.Linear`` init (the init before this option): there a
    hidden layer scales the input-dependent part of its output by about
    :math:`\bar\sigma / \sqrt 3 \cdot \phi' \approx 0.2` while the time shift (a
    one-input layer, entries uniform on [-1, 1]) stays of order one, so after three
    hidden layers the features hardly depend on ``z``: the field starts as a function
    of time alone and a density model sits near a Gaussian for about a thousand Adam
    steps at lr 1e-3 before it learns structure (see ``docs/benchmarks/density.md``).

    With ``state_scale=True`` the network's last layer gives two outputs per coordinate,
    a rate :math:`s` and a shift :math:`m`, and the field scales the state:

    .. math::
        f(t, z) = s(t, z) \odot z + m(t, z).

    Where the rate of a coordinate depends on the others only, the flow multiplies it by
    :math:`\exp \int_0^T s_i\,dt`. That is the change of scale a funnel asks for
    (:math:`x_i \propto e^{v/2}`, a factor of up to :math:`e^{4.5}` across the
    posterior), which a bounded tanh field :math:`m` alone can follow only within its
    range. Both outputs start near zero (``final_init_scale``), so the field does too.

    Shapes: ``t`` a scalar tensor or a time per row (a batch shape), ``z`` of shape
    ``(..., dim)``, the optional context of shape ``(..., context_dim)``; the output has
    the broadcast batch shape and ``dim`` features. The argument order ``(t, z)`` is
    torchdiffeq's.

    Arguments:
        dim: the state size D.
        hidden_dims: the hidden layer sizes.
        context_dim: the context size (0: no context).
        activation: the activation between layers (a name or a module class).
        final_init_scale: the scale of the last layer's initial weights.
        init: the hidden layers' initialisation, ``"preserve"`` or ``"torch"`` (above).
        state_scale: give the field the form :math:`s \odot z + m` (above).

    References:
        Neural Ordinary Differential Equations (Chen et al., 2018), arXiv:1806.07366.
        FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        (Grathwohl et al., 2018), arXiv:1810.01367.

    Example:
        >>> f = ODEDynamics(2, hidden_dims=(16, 16))
        >>> f(torch.tensor(0.0), torch.randn(8, 2)).shape
        torch.Size([8, 2])
        >>> ODEDynamics(2, state_scale=True)(torch.tensor(0.0), torch.randn(8, 2)).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str | Callable[[], nn.Module] = "tanh",
        final_init_scale: float = 1e-2,
        init: str = "preserve",
        state_scale: bool = False,
    ) -> None:
        super().__init__()
        if init not in DYNAMICS_INITS:
            raise ValueError(f"init must be one of {DYNAMICS_INITS}, got {init!r}")
        self.init = init
        self.state_scale = bool(state_scale)
        self.dim = dim = integer("dim", dim)
        self.context_dim = context_dim = integer("context_dim", context_dim, minimum=0)
        self.hidden_dims = hidden_dims = layer_sizes("hidden_dims", hidden_dims)
        sizes = [dim, *hidden_dims, 2 * dim if self.state_scale else dim]
        self.layers = nn.ModuleList(
            ConcatSquashLinear(n_in, n_out, context_dim)
            for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
        )
        make_activation = activation_module(activation)
        self.activations = nn.ModuleList(make_activation() for _ in hidden_dims)
        if init == "preserve":
            gain = _activation_gain(activation) / GATE_MEAN
            with torch.no_grad():
                for layer in list(self.layers)[:-1]:
                    std = gain / math.sqrt(layer.in_features)
                    layer.linear.weight.normal_(0.0, std)
                    layer.linear.bias.zero_()
                    layer.hyper.weight[layer.out_features :].zero_()  # the shift
                    layer.hyper.bias[layer.out_features :].zero_()
        final = self.layers[-1]
        with torch.no_grad():
            final.linear.weight.mul_(final_init_scale)
            final.linear.bias.zero_()
            final.hyper.weight.mul_(final_init_scale)
            final.hyper.bias[final.out_features :].zero_()  # the shift's bias; the gate's stays

    def forward(self, t: Tensor, z: Tensor, context: Tensor | None = None) -> Tensor:
        hidden = z
        # list(): slicing the ModuleList would build a new module on every evaluation.
        for layer, activation in zip(list(self.layers)[:-1], self.activations, strict=True):
            hidden = activation(layer(t, hidden, context))
        output = self.layers[-1](t, hidden, context)
        if not self.state_scale:
            return output
        rate, shift = output.chunk(2, dim=-1)
        return rate * z + shift

    def extra_repr(self) -> str:
        text = f"dim={self.dim}"
        text += f", context_dim={self.context_dim}" if self.context_dim else ""
        return text + (", state_scale=True" if self.state_scale else "")
