"""The continuous-depth network: a neural ODE solved by torchdiffeq, with adjoint gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS

from pyro_nf._validation import positive_number

__all__ = ["NeuralODE", "SolveStatistics"]

State = tuple[Tensor, ...]

# Tolerances below this many machine epsilons of the state's dtype cannot be met; an
# adaptive solver then shrinks its steps without end (float32 at 1e-10: tens of
# thousands of evaluations), so the solve raises them to this floor.
TOLERANCE_FLOOR_EPS = 10


class SolveStatistics:
    """Function evaluations of one solve: ``forward`` during the solve, ``backward`` after it.

    ``backward`` counts the evaluations of the adjoint solve that the backward pass
    runs for this solve (0 with ``adjoint=False``, where the backward pass goes
    through the autograd graph of the ``forward`` evaluations instead).
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0
        self.solving = True

    def __repr__(self) -> str:
        return f"SolveStatistics(forward={self.forward}, backward={self.backward})"


class _CountedFunction:
    """Wraps the right-hand side of one solve to count its evaluations."""

    def __init__(self, function: Callable[[Tensor, State], State], stats: SolveStatistics) -> None:
        self.function = function
        self.stats = stats

    def __call__(self, t: Tensor, state: State) -> State:
        if self.stats.solving:
            self.stats.forward += 1
        else:
            self.stats.backward += 1
        return self.function(t, state)


class NeuralODE(nn.Module):
    r"""A continuous-depth network: the solution ``z(T)`` of a neural ODE.

    .. math::
        \frac{dz(t)}{dt} = f(z(t), t; w), \qquad z(T) = z(0) + \int_0^T f(z(t), t; w)\,dt

    Gradients: with ``adjoint=True`` the backward pass solves the adjoint equation
    :math:`da/dt = -a^\top \partial f/\partial z`, :math:`a(T) = \partial L/\partial z(T)`
    backwards in time (``torchdiffeq.odeint_adjoint``) with every trainable tensor
    passed explicitly as ``adjoint_params``: the parameters of ``dynamics`` and the
    context when it requires a gradient. Memory does not grow with the number of
    solver steps. With ``adjoint=False`` autograd backpropagates through the solver's
    operations (exact gradients of the discretized solution, memory linear in the
    number of steps).

    Function evaluations: :attr:`nfe_forward` is the number of evaluations of ``f`` in
    the last solve, :attr:`nfe_backward` the number of evaluations made by the
    backward pass of that solve so far (the adjoint solve; 0 with ``adjoint=False``).
    :attr:`num_solves` counts the solves since construction or :meth:`reset_counters`.

    Shapes: ``z0`` is ``(..., D)``; with a scalar end time the output is ``z(T)`` of the
    same shape, with a 1-D tensor of times it is the trajectory ``(len(times), ..., D)``.

    Arguments:
        dynamics: the vector field, called as ``dynamics(t, z)`` or
            ``dynamics(t, z, context)``; e.g. :class:`~pyro_nf.nn.ODEDynamics`.
        adjoint: use the adjoint method for gradients.
        method: a torchdiffeq solver (``"dopri5"``, ``"rk4"``, ``"euler"``, ...).
        rtol: relative tolerance of an adaptive solver.
        atol: absolute tolerance of an adaptive solver. Both are raised to at least
            ten machine epsilons of the state's dtype for each solve (float32:
            1.2e-6; float64: 2.2e-15), so that float64 tolerances do not stall a
            float32 solve.
        options: solver options (e.g. ``{"step_size": 0.1}`` for a fixed-step solver).
        adjoint_options: options of the adjoint solve. Default: ``options`` with
            ``"norm": "seminorm"``, which leaves the parameter adjoints (integrals
            that nothing else depends on) out of the step-size control: fewer
            backward evaluations for the same accuracy of the state and its adjoint.
            Pass ``options`` itself (or ``{}``) for torchdiffeq's full norm.

    References:
        Neural Ordinary Differential Equations (Chen et al., 2018), arXiv:1806.07366.
        "Hey, that's not an ODE": Faster ODE Adjoints via Seminorms (Kidger et al.,
        2021), arXiv:2009.09457.

    Example:
        >>> from pyro_nf.nn import ODEDynamics
        >>> ode = NeuralODE(ODEDynamics(2, hidden_dims=(16,)), rtol=1e-4, atol=1e-4)
        >>> ode(torch.randn(8, 2), 1.0).shape
        torch.Size([8, 2])
        >>> ode(torch.randn(8, 2), torch.linspace(0, 1, 5)).shape
        torch.Size([5, 8, 2])
    """

    def __init__(
        self,
        dynamics: nn.Module,
        adjoint: bool = True,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: dict | None = None,
        adjoint_options: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dynamics, nn.Module):
            raise TypeError(f"dynamics must be an nn.Module, got {type(dynamics).__name__}")
        if method not in SOLVERS:
            raise ValueError(f"unknown solver method {method!r}; expected one of {sorted(SOLVERS)}")
        rtol = positive_number("rtol", rtol)
        atol = positive_number("atol", atol)
        self.dynamics = dynamics
        self.adjoint = bool(adjoint)
        self.method = method
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.options = dict(options) if options else None
        if adjoint_options is None:
            adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
            adjoint_options["norm"] = "seminorm"
        self.adjoint_options = dict(adjoint_options)
        self.num_solves = 0
        self.last_solve = SolveStatistics()
        self.last_solve.solving = False

    @property
    def nfe_forward(self) -> int:
        """Function evaluations of the last solve."""
        return self.last_solve.forward

    @property
    def nfe_backward(self) -> int:
        """Function evaluations of the backward pass of the last solve (adjoint solve)."""
        return self.last_solve.backward

    def reset_counters(self) -> None:
        """Set :attr:`num_solves` to zero."""
        self.num_solves = 0

    def solve(
        self,
        function: Callable[[Tensor, State], State],
        state: State,
        times: Tensor,
        adjoint_params: Sequence[Tensor],
    ) -> State:
        """Solve ``d state/dt = function(t, state)`` at ``times`` with this module's solver.

        The machinery shared by :meth:`forward` and the ODE flow transform, which
        solves an augmented state (z, log-det, ...). ``adjoint_params`` must hold every
        tensor that ``function`` uses and that needs a gradient. Returns one tensor of
        shape ``(len(times), *s.shape)`` per state component ``s``.
        """
        stats = SolveStatistics()
        counted = _CountedFunction(function, stats)
        floor = TOLERANCE_FLOOR_EPS * torch.finfo(state[0].dtype).eps
        kwargs = {
            "rtol": max(self.rtol, floor),
            "atol": max(self.atol, floor),
            "method": self.method,
            "options": self.options,
        }
        if self.adjoint:
            solution = odeint_adjoint(
                counted,
                state,
                times,
                adjoint_params=tuple(adjoint_params),
                adjoint_options=self.adjoint_options,
                **kwargs,
            )
        else:
            solution = odeint(counted, state, times, **kwargs)
        stats.solving = False
        self.last_solve = stats
        self.num_solves += 1
        return solution

    def forward(
        self, z0: Tensor, times: float | Tensor = 1.0, context: Tensor | None = None
    ) -> Tensor:
        """``z(T)`` for a scalar end time ``T`` (start 0), the trajectory for 1-D ``times``."""
        if not isinstance(z0, Tensor) or z0.dim() == 0:
            raise ValueError(f"expected z0 of shape (..., D), got {type(z0).__name__}")
        times = torch.as_tensor(times)
        if times.dim() > 1:
            raise ValueError(f"expected a scalar end time or 1-D times, got {tuple(times.shape)}")
        trajectory = times.dim() == 1
        if not trajectory:
            times = torch.stack([torch.zeros_like(times), times])
        times = times.to(device=z0.device, dtype=z0.dtype)
        dynamics = self.dynamics

        def function(t: Tensor, state: State) -> State:
            if context is None:
                return (dynamics(t, state[0]),)
            return (dynamics(t, state[0], context),)

        params = [p for p in self.dynamics.parameters() if p.requires_grad]
        if context is not None and context.requires_grad:
            params.append(context)
        (solution,) = self.solve(function, (z0,), times, params)
        return solution if trajectory else solution[-1]

    def extra_repr(self) -> str:
        return (
            f"adjoint={self.adjoint}, method={self.method!r}, rtol={self.rtol:g}, "
            f"atol={self.atol:g}"
        )
