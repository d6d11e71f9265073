"""Conditioner networks: they produce the parameters of coupling functions (MLP, MADE) or
the vector field of an ODE (ODEDynamics, NeuralODE), and know nothing about flows.

Example:
    >>> from pyro_nf.nn import MADE
    >>> made = MADE(4, num_params=2, hidden_dims=(16,))
    >>> made(torch.randn(3, 4)).shape   # parameters of x_d from x_<d only
    torch.Size([3, 4, 2])
"""

from pyro_nf.nn.dynamics import ConcatSquashLinear, ODEDynamics
from pyro_nf.nn.made import MADE, AutoregressiveSteps, MaskedLinear, autoregressive_order
from pyro_nf.nn.mlp import MLP, ScaledLinear, activation_module
from pyro_nf.nn.neural_ode import NeuralODE, SolveStatistics

__all__ = [
    "MADE",
    "MLP",
    "AutoregressiveSteps",
    "ConcatSquashLinear",
    "MaskedLinear",
    "NeuralODE",
    "ODEDynamics",
    "ScaledLinear",
    "SolveStatistics",
    "activation_module",
    "autoregressive_order",
]
