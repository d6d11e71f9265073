r"""Continuous flows: the ODE transform (CNF / FFJORD) and its trace estimators.

A continuous normalizing flow maps the base variable ``z = z(0)`` to the data
``x = z(T)`` by integrating a neural ODE, and gets the log-determinant from the
instantaneous change of variables, integrated jointly with the state in the same
solve:

.. math::
    \frac{dz}{dt} = f(z(t), t; w), \qquad
    \frac{d \log p(z(t))}{dt} = -\operatorname{tr}\frac{\partial f}{\partial z}, \qquad
    \log\left|\det \frac{\partial x}{\partial z}\right| =
    \int_0^T \operatorname{tr}\frac{\partial f}{\partial z}(z(t), t)\,dt
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pyro_nf._validation import positive_number
from pyro_nf.nn.dynamics import ODEDynamics
from pyro_nf.nn.neural_ode import NeuralODE
from pyro_nf.transforms.base import FlowTransform, _is_compiling, broadcast_context

__all__ = [
    "ContinuousFlow",
    "collect_regularization",
    "draw_probe",
    "exact_trace",
    "hutchinson_trace",
]

TRACE_ESTIMATORS = ("exact", "hutchinson")
PROBE_DISTRIBUTIONS = ("gaussian", "rademacher")
REGULARIZERS = ("kinetic_energy", "jacobian_frobenius")


def exact_trace(
    f: Tensor, z: Tensor, create_graph: bool = False, frobenius: bool = False
) -> tuple[Tensor, Tensor | None]:
    r"""The trace :math:`\operatorname{tr}(\partial f/\partial z)` of each sample, exactly.

    .. math::
        \operatorname{tr}\frac{\partial f}{\partial z} = \sum_{i=1}^D e_i^\top
        \frac{\partial f}{\partial z} e_i

    The D vector-Jacobian products :math:`e_i^\top \partial f/\partial z` run as one
    vectorized backward pass (``is_grads_batched``), not a Python loop, so the cost
    is about D backward passes of the network: use it for small D.

    Arguments:
        f: the output ``f(z)`` of shape ``(..., D)``, computed from ``z`` with grad enabled.
        z: the input of shape ``(..., D)`` (same shape as ``f``).
        create_graph: keep the graph of the trace (needed to differentiate it).
        frobenius: also return :math:`\|\partial f/\partial z\|_F^2` per sample.

    Returns:
        the trace of shape ``(...)`` and the squared Frobenius norm (or ``None``).

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> trace, _ = exact_trace(2 * z, z)
        >>> trace
        tensor([6., 6., 6., 6.])
    """
    dim = z.shape[-1]
    eye = torch.eye(dim, dtype=z.dtype, device=z.device)
    basis = eye.reshape((dim,) + (1,) * (f.dim() - 1) + (dim,)).expand((dim,) + f.shape)
    (rows,) = torch.autograd.grad(
        f, z, basis, create_graph=create_graph, is_grads_batched=True, allow_unused=True
    )
    if rows is None:  # f does not depend on z
        zero = f.new_zeros(f.shape[:-1])
        return zero, (zero if frobenius else None)
    # rows[i, ..., j] = df_i / dz_j
    trace = rows.diagonal(dim1=0, dim2=-1).sum(-1)
    return trace, (rows.pow(2).sum((0, -1)) if frobenius else None)


def hutchinson_trace(
    f: Tensor, z: Tensor, probe: Tensor, create_graph: bool = False, frobenius: bool = False
) -> tuple[Tensor, Tensor | None]:
    r"""Hutchinson's unbiased estimate of :math:`\operatorname{tr}(\partial f/\partial z)`.

    .. math::
        \operatorname{tr}\frac{\partial f}{\partial z} =
        \mathbb{E}_\epsilon\left[\epsilon^\top \frac{\partial f}{\partial z}\epsilon\right],
        \qquad
        \left\|\frac{\partial f}{\partial z}\right\|_F^2 =
        \mathbb{E}_\epsilon\left\|\epsilon^\top \frac{\partial f}{\partial z}\right\|^2

    for a probe :math:`\epsilon` with zero mean and identity covariance (Gaussian or
    Rademacher). One vector-Jacobian product per evaluation, whatever D.

    Arguments:
        f: the output ``f(z)`` of shape ``(..., D)``, computed from ``z`` with grad enabled.
        z: the input of shape ``(..., D)``.
        probe: the probe :math:`\epsilon` of shape ``(..., D)`` (see :func:`draw_probe`).
        create_graph: keep the graph of the estimate.
        frobenius: also return the estimate of :math:`\|\partial f/\partial z\|_F^2`.

    Returns:
        the estimate of shape ``(...)`` and the Frobenius estimate (or ``None``).

    References:
        A stochastic estimator of the trace of the influence matrix for Laplacian
        smoothing splines (Hutchinson, 1989). FFJORD (Grathwohl et al., 2018),
        arXiv:1810.01367.

    Example:
        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> probe = draw_probe(z, "rademacher")
        >>> hutchinson_trace(2 * z, z, probe)[0]  # exact for a multiple of the identity
        tensor([6., 6., 6., 6.])
    """
    (vjp,) = torch.autograd.grad(f, z, probe, create_graph=create_graph, allow_unused=True)
    if vjp is None:
        zero = f.new_zeros(f.shape[:-1])
        return zero, (zero if frobenius else None)
    return (vjp * probe).sum(-1), (vjp.pow(2).sum(-1) if frobenius else None)


def draw_probe(like: Tensor, distribution: str = "gaussian") -> Tensor:
    """A Hutchinson probe with the shape, dtype and device of ``like``.

    ``"gaussian"``: standard normal entries; ``"rademacher"``: entries ±1 with
    probability 1/2 (lower variance; exact for a diagonal Jacobian).

    Example:
        >>> draw_probe(torch.zeros(2, 3), "rademacher").abs()
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    if distribution == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, like.shape, dtype=like.dtype, device=like.device)
        return 2 * bits - 1
    raise ValueError(f"probe must be one of {PROBE_DISTRIBUTIONS}, got {distribution!r}")


class ContinuousFlow(FlowTransform):
    r"""The ODE flow transform (continuous normalizing flow, FFJORD), with adjoint gradients.

    .. math::
        x = z(T) = z + \int_0^T f(z(t), t[, c]; w)\,dt, \qquad
        \log\left|\det\frac{\partial x}{\partial z}\right| =
        \int_0^T \operatorname{tr}\frac{\partial f}{\partial z}(z(t), t)\,dt

    Direction: z -> x (``_call``, sampling) integrates from 0 to T; x -> z
    (``_inverse``, density) integrates from T back to 0. Both are one ODE solve
    whose state is augmented with the log-determinant (and, with
    ``regularize=True``, the two regularizers), so ``log_prob`` is one solve and
    ``rsample`` followed by ``log_prob`` of the same draws is one solve too (the pair
    and its log-det are cached by :class:`FlowTransform`).

    Trace estimator (:attr:`trace`, switchable at any time, e.g. to ``"exact"`` for
    evaluation after training with ``"hutchinson"``): ``"exact"`` computes the trace
    with D vectorized vector-Jacobian products (small D); ``"hutchinson"`` uses one
    probe (:attr:`probe`: ``"gaussian"`` or ``"rademacher"``) per sample, drawn once
    per solve and used for every evaluation of that solve, including the adjoint
    solve of its backward pass; the log-determinant is then an unbiased estimate.
    Neither the estimator nor the gradients depend on ``train()`` / ``eval()``.

    Integration time: the solve runs on :math:`s \in [0, 1]` with the field
    :math:`T f(z, sT)`, so a learnable :math:`T = \operatorname{softplus}(\tau)`
    (``learn_time=True``) is an ordinary parameter of the dynamics and gets its
    gradient from the adjoint solve like any other.

    Regularizers (``regularize=True``, as in "How to train your neural ODE"):
    :attr:`regularization` then holds, after each solve, a dict of per-sample
    tensors of the batch shape, integrated along that solve's trajectory over
    :math:`[0, T]` in the same solve:

    * ``"kinetic_energy"``: :math:`\int_0^T \|f(z(t), t)\|^2\,dt`;
    * ``"jacobian_frobenius"``: :math:`\int_0^T \|\partial f/\partial z\|_F^2\,dt`,
      exact with ``trace="exact"``, estimated with the same probe as the trace with
      ``trace="hutchinson"``.

    It is replaced (not accumulated) by every solve of this transform, in either
    direction, and is ``None`` before the first solve and when ``regularize=False``.
    A ``log_prob`` answered from the cache runs no solve and leaves it unchanged (it
    still belongs to that cached pair). The tensors carry the solve's graph: add them
    to the loss of the same step (see :func:`collect_regularization`). With
    ``regularize=True`` they are part of the solver's state, so they take part in
    its step-size control.

    Function evaluations of the last solve: ``self.ode.nfe_forward`` and
    ``self.ode.nfe_backward``; ``self.ode.num_solves`` counts solves.

    Precision: the solve runs in the dtype and on the device of the input. The
    default tolerances (``1e-5``) suit float32 training; float64 checks of the
    log-det or of round trips need tight ones (e.g. ``rtol=atol=1e-10``).

    Arguments:
        dim: the event size D.
        dynamics: the vector field, called as ``dynamics(t, z)`` (or with the context
            as a third argument); default an :class:`~pyro_nf.nn.ODEDynamics`.
        hidden_dims: hidden sizes of the default dynamics.
        context_dim: the context size for a conditional flow (0: unconditional).
        activation: the activation of the default dynamics (a smooth one).
        trace: ``"exact"`` or ``"hutchinson"``.
        probe: the Hutchinson probe distribution, ``"gaussian"`` or ``"rademacher"``.
        time: the integration time T (> 0); the initial value when learnable.
        learn_time: learn T (kept positive by a softplus).
        regularize: integrate the kinetic-energy and Jacobian-norm regularizers.
        adjoint: adjoint gradients (memory flat in the number of steps) or
            backpropagation through the solver.
        method: the torchdiffeq solver.
        rtol: the solver's relative tolerance.
        atol: the solver's absolute tolerance.
        options: solver options (``{"step_size": ...}`` for fixed-step solvers).
        adjoint_options: options of the adjoint solve (default: the seminorm, see
            :class:`~pyro_nf.nn.NeuralODE`).
        cache_size: 1 keeps the last pair and its log-det, 0 nothing.

    References:
        Neural Ordinary Differential Equations (Chen et al., 2018), arXiv:1806.07366.
        FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
        (Grathwohl et al., 2018), arXiv:1810.01367.
        How to Train Your Neural ODE: the World of Jacobian and Kinetic Regularization
        (Finlay et al., 2020), arXiv:2002.02798.

    Example:
        >>> flow = ContinuousFlow(2, hidden_dims=(16,), rtol=1e-4, atol=1e-4)
        >>> z = torch.randn(5, 2)
        >>> x = flow(z)
        >>> flow.log_abs_det_jacobian(z, x).shape
        torch.Size([5])
        >>> torch.allclose(flow.inv(x.detach()), z, atol=1e-3)
        True
    """

    def __init__(
        self,
        dim: int,
        dynamics: nn.Module | None = None,
        hidden_dims: Sequence[int] = (64, 64),
        context_dim: int = 0,
        activation: str | Callable[[], nn.Module] = "tanh",
        trace: str = "exact",
        probe: str = "gaussian",
        time: float = 1.0,
        learn_time: bool = False,
        regularize: bool = False,
        adjoint: bool = True,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        options: dict | None = None,
        adjoint_options: dict | None = None,
        cache_size: int = 1,
    ) -> None:
        super().__init__(dim, context_dim, cache_size)
        self.trace = trace
        self.probe = probe
        time = positive_number("time", time)
        if dynamics is None:
            dynamics = ODEDynamics(dim, hidden_dims, context_dim, activation)
        for name, expected in (("dim", dim), ("context_dim", context_dim)):
            given = getattr(dynamics, name, expected)
            if given != expected:
                raise ValueError(f"the dynamics have {name}={given}, expected {name}={expected}")
        self.ode = NeuralODE(dynamics, adjoint, method, rtol, atol, options, adjoint_options)
        self.learn_time = bool(learn_time)
        if self.learn_time:
            # softplus^{-1}(T) = log(exp(T) - 1)
            self.raw_time = nn.Parameter(torch.tensor(math.log(math.expm1(time))))
        else:
            self.register_buffer("fixed_time", torch.tensor(float(time)))
        self.regularize = bool(regularize)
        self._regularization: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- options
    @property
    def trace(self) -> str:
        """The trace estimator, ``"exact"`` or ``"hutchinson"``; may be switched at any time."""
        return self._trace

    @trace.setter
    def trace(self, value: str) -> None:
        if value not in TRACE_ESTIMATORS:
            raise ValueError(f"trace must be one of {TRACE_ESTIMATORS}, got {value!r}")
        self._trace = value

    @property
    def probe(self) -> str:
        """The Hutchinson probe distribution, ``"gaussian"`` or ``"rademacher"``."""
        return self._probe

    @probe.setter
    def probe(self, value: str) -> None:
        if value not in PROBE_DISTRIBUTIONS:
            raise ValueError(f"probe must be one of {PROBE_DISTRIBUTIONS}, got {value!r}")
        self._probe = value

    @property
    def dynamics(self) -> nn.Module:
        """The vector field ``f(t, z[, c])``."""
        return self.ode.dynamics

    @property
    def end_time(self) -> Tensor:
        """The integration time T (a scalar tensor; differentiable when learnable)."""
        if self.learn_time:
            return nn.functional.softplus(self.raw_time)
        return self.fixed_time

    @property
    def regularization(self) -> dict[str, Tensor] | None:
        """The regularizers integrated along the last solve (see the class docstring)."""
        return self._regularization

    # ----------------------------------------------------------------- the solve
    def _solve(
        self, value: Tensor, context: Tensor | None, inverse: bool, with_log_det: bool = True
    ) -> tuple[Tensor, Tensor]:
        """One solve over the finite rows; empty batches and non-finite rows never reach it.

        An adaptive solver takes one step size for the whole batch, so a single row
        with an infinite or NaN entry would drive it to a zero step ("underflow in dt").
        Such rows are left out of the solve and come back as NaN (the answer of every
        other family for them), and an empty batch needs no solve at all. Without
        ``with_log_det`` the state is solved alone and the log-det returned is zeros.
        """
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "ContinuousFlow cannot be traced by torch.jit (JitTrace_ELBO and friends): "
                "the trace of its Jacobian needs torch.autograd.grad and the adaptive solver "
                "takes data-dependent steps; train it with Trace_ELBO (torch.compile works)"
            )
        value, context = broadcast_context(value, context)
        batch_shape = value.shape[:-1]
        if value.numel() == 0:
            zeros = value.new_zeros(batch_shape)
            self._regularization = dict.fromkeys(REGULARIZERS, zeros) if self.regularize else None
            return value.clone(), zeros
        if _is_compiling():
            # Under torch.compile a data-dependent branch would break the graph: every
            # row goes to the solver, as written by the caller.
            return self._solve_rows(value, context, inverse, with_log_det)
        finite = torch.isfinite(value).all(-1)
        if context is not None:
            finite = finite & torch.isfinite(context).all(-1)
        if bool(finite.all()):
            return self._solve_rows(value, context, inverse, with_log_det)
        output = torch.full_like(value, float("nan"))
        log_det = value.new_full(batch_shape, float("nan"))
        if bool(finite.any()):
            rows = (value[finite], None if context is None else context[finite])
            output[finite], log_det[finite] = self._solve_rows(*rows, inverse, with_log_det)
            if self._regularization is not None:
                self._regularization = {
                    name: value.new_full(batch_shape, float("nan")).index_put((finite,), term)
                    for name, term in self._regularization.items()
                }
        return output, log_det

    def _solve_rows(
        self, value: Tensor, context: Tensor | None, inverse: bool, with_log_det: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The augmented solve of ``(z, log-det[, regularizers])`` for finite rows.

        Without ``with_log_det`` (and without ``regularize``) the state ``z`` alone,
        and the log-det returned is zeros.
        """
        end_time = self.end_time.to(value)
        dynamics = self.ode.dynamics
        regularize = self.regularize
        exact = self.trace == "exact"
        zeros = value.new_zeros(value.shape[:-1])
        times = value.new_tensor([1.0, 0.0] if inverse else [0.0, 1.0])
        adjoint_params = [p for p in self.parameters() if p.requires_grad]
        if context is not None and context.requires_grad:
            adjoint_params.append(context)

        def field(s: Tensor, z: Tensor) -> Tensor:
            t = s * end_time
            return dynamics(t, z) if context is None else dynamics(t, z, context)

        if not (with_log_det or regularize):
            self._regularization = None
            state_only = self.ode.solve(
                lambda s, state: (end_time * field(s, state[0]),), (value,), times, adjoint_params
            )
            return state_only[0][-1], zeros
        # One probe per solve: the adjoint solve of the backward pass reuses it.
        probe = None if exact else draw_probe(value, self.probe)
        differentiable = value.requires_grad or bool(adjoint_params)

        def augmented(s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            create_graph = differentiable and torch.is_grad_enabled()
            # The trace needs autograd even inside the adjoint's no-grad forward solve.
            with torch.enable_grad():
                z = state[0]
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                f = field(s, z)
                if exact:
                    trace, frobenius = exact_trace(f, z, create_graph, regularize)
                else:
                    trace, frobenius = hutchinson_trace(f, z, probe, create_graph, regularize)
            derivatives = (end_time * f, end_time * trace)
            if regularize:
                kinetic = f.pow(2).sum(-1)
                derivatives += (end_time * kinetic, end_time * frobenius)
            if not create_graph:
                derivatives = tuple(d.detach() for d in derivatives)
            return derivatives

        initial = (value, zeros) + ((zeros, zeros) if regularize else ())
        solution = self.ode.solve(augmented, initial, times, adjoint_params)
        sign = -1.0 if inverse else 1.0
        if regularize:
            self._regularization = {
                name: sign * component[-1]
                for name, component in zip(REGULARIZERS, solution[2:], strict=True)
            }
        else:
            self._regularization = None
        return solution[0][-1], sign * solution[1][-1]

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, inverse=False)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, inverse=True)

    def forward_without_log_det(self, z: Tensor) -> Tensor:
        r"""z -> x, ``(..., D)`` to ``(..., D)``, by a solve of the state alone.

        For a draw whose log-det is never read: :math:`x = z + \int_0^T f(z(t), t)\,dt`
        with no trace of the field's Jacobian (D vector-Jacobian products per evaluation
        with ``trace="exact"``, one with ``"hutchinson"``), and the solver's step
        control sees the state alone. Nothing is cached. With ``regularize=True`` it is
        the full solve, whose regularizers belong to the loss.

        Example:
            >>> flow = ContinuousFlow(2, hidden_dims=(8,), rtol=1e-6, atol=1e-6)
            >>> z = torch.randn(4, 2)
            >>> torch.allclose(flow.forward_without_log_det(z), flow(z), atol=1e-4)
            True
        """
        if self.regularize:
            return self(z)
        self._check(z, None, "input z")
        return self._solve(z, None, inverse=False, with_log_det=False)[0]

    def __getstate__(self) -> dict:
        # The regularizers hold the last solve's autograd graph, which cannot be copied.
        state = super().__getstate__()
        state["_regularization"] = None
        return state

    def extra_repr(self) -> str:
        time = "learned" if self.learn_time else f"{float(self.fixed_time):g}"
        ode = self.ode
        hidden = getattr(self.dynamics, "hidden_dims", None)
        return (
            f"{super().extra_repr()}"
            + ("" if hidden is None else f", hidden={hidden}")
            + f", trace={self.trace!r}, time={time}, method={ode.method!r}, "
            f"rtol={ode.rtol:g}, atol={ode.atol:g}, adjoint={ode.adjoint}"
            + (", regularize=True" if self.regularize else "")
        )


def collect_regularization(module: nn.Module) -> dict[str, Tensor]:
    """Sum the regularizers of every :class:`ContinuousFlow` inside ``module``.

    Returns a dict with ``"kinetic_energy"`` and ``"jacobian_frobenius"``: per-sample
    tensors, summed over the layers' last solves (layers built with
    ``regularize=True``). Raises ``ValueError`` if no such layer has solved yet.

    Example:
        >>> import pyro_nf
        >>> flow = pyro_nf.cnf(2, hidden_dims=(8,), num_layers=2, regularize=True)
        >>> data = torch.randn(16, 2)
        >>> loss = -flow.log_prob(data).mean()
        >>> penalty = collect_regularization(flow)
        >>> loss = loss + 0.01 * (penalty["kinetic_energy"] + penalty["jacobian_frobenius"]).mean()
        >>> penalty["kinetic_energy"].shape
        torch.Size([16])

    Inside a Pyro model, ``pyro.factor("regularization", -weight * penalty.sum())``
    right after the observed ``pyro.sample`` adds it to the ELBO's loss.
    """
    found = [
        layer.regularization
        for layer in module.modules()
        if isinstance(layer, ContinuousFlow) and layer.regularization is not None
    ]
    if not found:
        raise ValueError(
            "no ContinuousFlow with regularize=True has run a solve in this module: build "
            "it with regularize=True and evaluate log_prob or rsample first"
        )
    return {name: sum(entry[name] for entry in found) for name in REGULARIZERS}
