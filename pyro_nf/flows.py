"""The :class:`Flow` module and the builders that return one.

A :class:`Flow` owns a standard normal base distribution (its location and scale are
buffers, so they follow ``.to(device)`` and ``.double()``) and a stack of transforms
mapping the base variable ``z`` to the data ``x``. Calling it returns a Pyro
distribution::

    flow = pyro_nf.realnvp(dim=2)
    d = flow()                    # TransformedDistribution over x, event shape (2,)
    x = d.rsample((100,))         # z -> x through the stack
    d.log_prob(x)                 # uses the cached pairs: no inverse pass

A conditional flow (``context_dim > 0``) is called with a context of shape
``(..., context_dim)``; the distribution's batch shape is the context's batch shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import Tensor, nn
from torch.distributions import Transform

from pyro_nf.transforms.autoregressive import (
    Autoregressive,
    InverseAutoregressive,
    MaskedAutoregressive,
)
from pyro_nf.transforms.continuous import ContinuousFlow
from pyro_nf.transforms.coupling import Coupling, half_mask
from pyro_nf.transforms.coupling_functions import CouplingFunction, coupling_function
from pyro_nf.transforms.glue import ActNorm, LULinear, Permutation

__all__ = [
    "Flow",
    "FLOW_BUILDERS",
    "cnf",
    "flow_builder",
    "iaf",
    "maf",
    "realnvp",
    "permutation_layer",
]


class Flow(nn.Module):
    """A normalizing flow: a standard normal base distribution and a transform stack.

    Arguments:
        transforms: the layers, applied in order from the base ``z`` to the data ``x``.
            Pyro transforms and conditional transforms are both accepted.
        dim: the event size D.
        context_dim: the context size for a conditional flow, 0 otherwise.

    Attributes:
        transform: the whole stack as one module mapping z -> x: a
            ``ComposeTransformModule`` (or, for a conditional flow, a
            ``ConditionalComposeTransformModule`` whose ``.condition(context)`` gives
            one), usable in any Pyro code that takes a transform.

    Example:
        >>> flow = realnvp(dim=3, num_layers=2, hidden_dims=(16,))
        >>> x = flow().sample((5,))
        >>> flow().log_prob(x).shape
        torch.Size([5])
    """

    def __init__(self, transforms: Sequence[Transform], dim: int, context_dim: int = 0) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = dim
        self.context_dim = context_dim
        transforms = list(transforms)
        if context_dim > 0:
            self.transform = ConditionalComposeTransformModule(transforms)
        else:
            self.transform = ComposeTransformModule(transforms)
        self.register_buffer("base_loc", torch.zeros(dim))
        self.register_buffer("base_scale", torch.ones(dim))

    @property
    def layers(self) -> list[Transform]:
        """The transforms from z to x."""
        if self.context_dim > 0:
            return list(self.transform.transforms)
        return list(self.transform.parts)

    def _check_context(self, context: Tensor | None) -> None:
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("this flow is unconditional (context_dim=0) but got a context")
            return
        if context is None:
            raise ValueError(
                f"this flow is conditional: call it with a context of shape (..., {self.context_dim})"
            )
        if not isinstance(context, Tensor) or context.dim() == 0:
            raise ValueError(f"expected a context tensor of shape (..., {self.context_dim})")
        if context.shape[-1] != self.context_dim:
            raise ValueError(
                f"expected a context with last dimension {self.context_dim}, "
                f"got shape {tuple(context.shape)}"
            )

    def base_distribution(
        self, batch_shape: torch.Size | tuple[int, ...] = ()
    ) -> dist.Distribution:
        """The standard normal over z with event shape ``(D,)`` on the flow's device and dtype."""
        base = dist.Normal(self.base_loc, self.base_scale)
        if batch_shape:
            base = base.expand(torch.Size(batch_shape) + (self.dim,))
        return base.to_event(1)

    def forward(self, context: Tensor | None = None) -> dist.TransformedDistribution:
        """The distribution of x (conditioned on ``context`` for a conditional flow)."""
        self._check_context(context)
        if context is None:
            return dist.TransformedDistribution(self.base_distribution(), self.layers)
        layers = self.transform.condition(context).parts
        return dist.TransformedDistribution(self.base_distribution(context.shape[:-1]), layers)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x)`` of shape ``x.shape[:-1]`` (x -> z, density direction)."""
        return self(context).log_prob(x)

    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = (), context: Tensor | None = None
    ) -> Tensor:
        """Draws without gradient, shape ``sample_shape + batch_shape + (D,)`` (z -> x)."""
        return self(context).sample(torch.Size(sample_shape))

    def rsample(
        self, sample_shape: torch.Size | tuple[int, ...] = (), context: Tensor | None = None
    ) -> Tensor:
        """Reparametrized draws, differentiable with respect to the parameters (z -> x)."""
        return self(context).rsample(torch.Size(sample_shape))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, context_dim={self.context_dim}"


def permutation_layer(kind: str | None, dim: int, seed: int) -> Transform | None:
    """A glue layer between flow layers: ``"reverse"``, ``"random"``, ``"lu"`` or ``None``."""
    if kind is None or kind == "none":
        return None
    if kind == "reverse":
        return Permutation.reverse(dim)
    if kind == "random":
        return Permutation.random(dim, seed=seed)
    if kind == "lu":
        return LULinear(dim, permutation="random", seed=seed)
    raise ValueError(f"unknown permutation {kind!r}; expected 'reverse', 'random', 'lu' or None")


def _check_builder_args(
    dim: int, num_layers: int, context_dim: int, layers_name: str = "num_layers"
) -> None:
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{layers_name} must be a positive integer, got {num_layers!r}")
    if not isinstance(context_dim, int) or context_dim < 0:
        raise ValueError(f"context_dim must be a non-negative integer, got {context_dim!r}")


def realnvp(
    dim: int,
    num_layers: int = 4,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    coupling: str | CouplingFunction = "affine",
    coupling_kwargs: dict | None = None,
    activation: str = "relu",
    permutation: str | None = None,
    actnorm: bool = False,
    seed: int = 0,
) -> Flow:
    """A coupling flow (real NVP; NICE with ``coupling="additive"``; spline coupling).

    Layer ``i`` keeps one half of the coordinates and transforms the other half with
    ``h(z_B; g(z_A))``; consecutive layers swap the halves (the reference text's
    double layer), so every coordinate is transformed. Direction: both z -> x
    (sampling) and x -> z (density) are one pass per layer.

    Arguments:
        dim: the event size D (at least 2).
        num_layers: the number of coupling layers.
        hidden_dims: hidden sizes of each layer's MLP conditioner.
        context_dim: context size for a conditional flow (0: unconditional).
        coupling: ``"affine"`` (real NVP), ``"additive"`` (NICE), ``"spline"``
            (rational-quadratic) or a :class:`CouplingFunction`.
        coupling_kwargs: keyword arguments of the coupling function (e.g.
            ``{"num_bins": 8, "bound": 3.0}`` for the spline).
        activation: the conditioners' activation.
        permutation: an extra glue layer after every coupling layer but the last:
            ``None`` (default), ``"reverse"``, ``"random"`` or ``"lu"``.
        actnorm: put an :class:`ActNorm` layer before every coupling layer.
        seed: seed of random permutations.

    Returns:
        a :class:`Flow` whose ``transform`` maps z -> x.

    Example:
        >>> flow = realnvp(dim=2, num_layers=4, hidden_dims=(32, 32))
        >>> flow.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])
    """
    _check_builder_args(dim, num_layers, context_dim)
    if dim < 2:
        raise ValueError(
            f"a coupling flow needs dim >= 2 to split the input in two, got dim={dim}; "
            "use an autoregressive flow (maf/iaf) or a continuous flow (cnf) in one dimension"
        )
    function = coupling_function(coupling, **(coupling_kwargs or {}))
    layers: list[Transform] = []
    for i in range(num_layers):
        if actnorm:
            layers.append(ActNorm(dim))
        layers.append(
            Coupling(
                half_mask(dim, first_half=i % 2 == 0),
                function,
                hidden_dims=hidden_dims,
                context_dim=context_dim,
                activation=activation,
            )
        )
        glue = permutation_layer(permutation, dim, seed + i) if i < num_layers - 1 else None
        if glue is not None:
            layers.append(glue)
    return Flow(layers, dim, context_dim)


def cnf(
    dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    num_blocks: int = 1,
    trace: str = "exact",
    probe: str = "gaussian",
    adjoint: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    options: dict | None = None,
    context_dim: int = 0,
    time: float = 1.0,
    learn_time: bool = False,
    regularize: bool = False,
    actnorm: bool = False,
    activation: str = "tanh",
) -> Flow:
    r"""A continuous normalizing flow (FFJORD): ``num_blocks`` ODE transforms in a row.

    Each block integrates :math:`dz/dt = f_k(z, t[, c])` over :math:`[0, T]` with the
    log-determinant :math:`\int_0^T \operatorname{tr}(\partial f_k/\partial z)\,dt`
    in the same solve (see :class:`~pyro_nf.transforms.ContinuousFlow`). Direction:
    z -> x (sampling) and x -> z (density) are one ODE solve per block each.

    Arguments:
        dim: the event size D (1 is allowed).
        hidden_dims: hidden sizes of each block's concat-squash dynamics network.
        num_blocks: the number of ODE blocks.
        trace: ``"exact"`` (small D) or ``"hutchinson"`` (large D); switchable later
            through each block's ``trace`` attribute.
        probe: the Hutchinson probe, ``"gaussian"`` or ``"rademacher"``.
        adjoint: adjoint gradients (flat memory) or backpropagation through the solver.
        rtol: the solver's relative tolerance.
        atol: the solver's absolute tolerance.
        method: the torchdiffeq solver, e.g. ``"dopri5"`` or ``"rk4"``.
        options: solver options, e.g. ``{"step_size": 0.05}`` for fixed-step solvers.
        context_dim: context size for a conditional flow (0: unconditional).
        time: the integration time T of each block.
        learn_time: learn each block's T.
        regularize: integrate the kinetic-energy and Jacobian-norm regularizers (read
            them with :func:`~pyro_nf.transforms.collect_regularization`).
        actnorm: put an :class:`ActNorm` layer before every block.
        activation: the dynamics' activation (smooth: ``"tanh"`` or ``"softplus"``).

    Returns:
        a :class:`Flow` whose ``transform`` maps z -> x.

    Example:
        >>> flow = cnf(dim=2, hidden_dims=(16, 16), rtol=1e-4, atol=1e-4)
        >>> flow.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])
    """
    _check_builder_args(dim, num_blocks, context_dim, layers_name="num_blocks")
    layers: list[Transform] = []
    for _ in range(num_blocks):
        if actnorm:
            layers.append(ActNorm(dim))
        layers.append(
            ContinuousFlow(
                dim,
                hidden_dims=hidden_dims,
                context_dim=context_dim,
                activation=activation,
                trace=trace,
                probe=probe,
                time=time,
                learn_time=learn_time,
                regularize=regularize,
                adjoint=adjoint,
                method=method,
                rtol=rtol,
                atol=atol,
                options=options,
            )
        )
    return Flow(layers, dim, context_dim)


def _autoregressive_flow(
    layer_class: type[Autoregressive],
    dim: int,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int,
    coupling: str | CouplingFunction,
    coupling_kwargs: dict | None,
    permutation: str | None,
    order: str | Sequence[int] | Tensor,
    activation: str,
    residual: bool,
    seed: int,
) -> Flow:
    _check_builder_args(dim, num_layers, context_dim)
    function = coupling_function(coupling, **(coupling_kwargs or {}))
    layers: list[Transform] = []
    for i in range(num_layers):
        layers.append(
            layer_class(
                dim,
                function,
                hidden_dims=hidden_dims,
                context_dim=context_dim,
                order=order,
                seed=seed + i,
                activation=activation,
                residual=residual,
            )
        )
        glue = permutation_layer(permutation, dim, seed + i) if i < num_layers - 1 else None
        if glue is not None:
            layers.append(glue)
    return Flow(layers, dim, context_dim)


def maf(
    dim: int,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    coupling: str | CouplingFunction = "affine",
    coupling_kwargs: dict | None = None,
    permutation: str | None = "reverse",
    order: str | Sequence[int] | Tensor = "natural",
    activation: str = "relu",
    residual: bool = False,
    seed: int = 0,
) -> Flow:
    r"""A masked autoregressive flow: a stack of :class:`MaskedAutoregressive` layers.

    Each layer is :math:`x_d = h(z_d;\ g_d(x_{<d}))` with a MADE conditioner ``g``.
    Direction: x -> z (density, ``log_prob``) is one pass per layer; z -> x (sampling)
    is D sequential passes per layer. The choice for density estimation.

    Arguments:
        dim: the event size D (1 is allowed).
        num_layers: the number of autoregressive layers.
        hidden_dims: hidden sizes of each layer's MADE.
        context_dim: context size for a conditional flow (0: unconditional).
        coupling: ``"affine"``, ``"additive"``, ``"spline"`` (rational-quadratic) or a
            :class:`CouplingFunction`.
        coupling_kwargs: keyword arguments of the coupling function (e.g.
            ``{"num_bins": 8, "bound": 3.0}`` for the spline).
        permutation: a glue layer after every layer but the last: ``"reverse"``
            (default), ``"random"``, ``"lu"`` or ``None``.
        order: the autoregressive order inside each layer: ``"natural"`` (default),
            ``"reverse"``, ``"random"`` (seeded per layer) or an explicit permutation.
        activation: the conditioners' activation.
        residual: residual hidden layers in the conditioners (equal hidden sizes).
        seed: seed of random orders and permutations.

    Returns:
        a :class:`Flow` whose ``transform`` maps z -> x.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017),
        arXiv:1705.07057.

    Example:
        >>> flow = maf(dim=2, num_layers=3, hidden_dims=(32, 32))
        >>> flow.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])
    """
    return _autoregressive_flow(
        MaskedAutoregressive,
        dim,
        num_layers,
        hidden_dims,
        context_dim,
        coupling,
        coupling_kwargs,
        permutation,
        order,
        activation,
        residual,
        seed,
    )


def iaf(
    dim: int,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    coupling: str | CouplingFunction = "affine",
    coupling_kwargs: dict | None = None,
    permutation: str | None = "reverse",
    order: str | Sequence[int] | Tensor = "natural",
    activation: str = "relu",
    residual: bool = False,
    seed: int = 0,
) -> Flow:
    r"""An inverse autoregressive flow: a stack of :class:`InverseAutoregressive` layers.

    Each layer is :math:`x_d = h(z_d;\ g_d(z_{<d}))` with a MADE conditioner ``g``.
    Direction: z -> x (sampling, ``rsample``) is one pass per layer, and the
    log-density of the flow's own draws comes from the cache; x -> z (density of other
    points) is D sequential passes per layer. The choice for variational posteriors.

    Arguments: as for :func:`maf`.

    Returns:
        a :class:`Flow` whose ``transform`` maps z -> x.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al.,
        2016), arXiv:1606.04934.

    Example:
        >>> flow = iaf(dim=2, num_layers=3, hidden_dims=(32, 32))
        >>> d = flow()
        >>> x = d.rsample((10,))
        >>> d.log_prob(x).shape
        torch.Size([10])
    """
    return _autoregressive_flow(
        InverseAutoregressive,
        dim,
        num_layers,
        hidden_dims,
        context_dim,
        coupling,
        coupling_kwargs,
        permutation,
        order,
        activation,
        residual,
        seed,
    )


#: Every flow family by name: the one registry that ``AutoFlow(model, flow=name)``, the
#: examples, the benchmarks and the tests read. Each value builds a :class:`Flow` from
#: ``(dim, **options)``.
FLOW_BUILDERS: dict[str, Callable[..., Flow]] = {
    "iaf": iaf,
    "maf": maf,
    "realnvp": realnvp,
    "cnf": cnf,
}


def flow_builder(name: str) -> Callable[..., Flow]:
    """The builder of the flow family ``name`` (a key of :data:`FLOW_BUILDERS`).

    Raises:
        ValueError: naming the known families when ``name`` is not one of them.

    Example:
        >>> flow_builder("maf")(dim=2, num_layers=1, hidden_dims=(8,)).dim
        2
    """
    try:
        return FLOW_BUILDERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown flow family {name!r}; expected one of {tuple(FLOW_BUILDERS)}"
        ) from None
