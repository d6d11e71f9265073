"""The :class:`Flow` module and the builders that return one.

A :class:`Flow` owns a base distribution, the standard normal or (``base="student_t"``)
independent Student-t coordinates with learned degrees of freedom (its location and
scale are buffers, so they follow ``.to(device)`` and ``.double()``) and a stack of transforms
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
from torch.distributions.utils import _sum_rightmost

from pyro_nf._validation import check_context, check_input_dtype, integer, is_real_support
from pyro_nf.nn.made import autoregressive_order
from pyro_nf.transforms.autoregressive import (
    Autoregressive,
    InverseAutoregressive,
    MaskedAutoregressive,
)
from pyro_nf.transforms.continuous import ContinuousFlow
from pyro_nf.transforms.coupling import Coupling, half_mask
from pyro_nf.transforms.coupling_functions import CouplingFunction
from pyro_nf.transforms.coupling_functions import coupling_function as make_coupling_function
from pyro_nf.transforms.glue import ActNorm, LULinear, Permutation

__all__ = [
    "Flow",
    "FlowDistribution",
    "FLOW_BASES",
    "FLOW_BUILDERS",
    "cnf",
    "flow_builder",
    "iaf",
    "layer_coupling_functions",
    "maf",
    "realnvp",
    "permutation_layer",
]


def _all_finite(value: Tensor) -> bool:
    """Whether every entry of ``value`` is finite, in one reduction where it can be.

    A NaN or an infinite entry makes the sum NaN or infinite, so a finite sum settles
    it (one pass, about twenty times cheaper than ``isfinite(value).all()``); only a
    non-finite sum, which finite values can also give by overflowing, needs the test
    per entry.
    """
    return bool(torch.isfinite(value.detach().sum())) or bool(torch.isfinite(value).all())


class FlowDistribution(dist.TransformedDistribution):
    """The distribution of a :class:`Flow`'s ``x``: Pyro's ``TransformedDistribution`` with
    the package's input policy for ``log_prob``.

    - an empty batch ``(0, D)`` gives an empty result ``(0,)`` (torch's own support check
      cannot reshape an empty tensor, so it is skipped when there is nothing to check);
    - with validation on (Pyro's default), an ``x`` with a NaN or infinite entry is a
      ``ValueError`` that names the rows, raised before any pass; with validation off
      (``pyro.enable_validation(False)``) a row holding a NaN gets a NaN log-density, a
      row holding an infinity ``-inf`` (zero density), and every other row its exact
      value, for every family.

    Example:
        >>> d = realnvp(dim=2, num_layers=1, hidden_dims=(8,))()
        >>> d.log_prob(torch.zeros(0, 2)).shape
        torch.Size([0])
    """

    def _validate_sample(self, value: Tensor) -> None:
        if value.numel() == 0:
            event = self.event_shape
            if value.shape[value.dim() - len(event) :] != event:
                raise ValueError(
                    f"expected a value with event shape {tuple(event)}, got shape "
                    f"{tuple(value.shape)}"
                )
            return
        if value.dtype.is_floating_point and not _all_finite(value):
            finite = torch.isfinite(value)
            if value.dim() > 0:
                finite = finite.all(-1)  # one flag per row of the (..., D) value
            rows = (~finite).nonzero().tolist()
            raise ValueError(
                f"log_prob is defined for finite x; {len(rows)} of {finite.numel()} rows "
                f"hold NaN or infinite values (first at index {tuple(rows[0])}). Pass "
                "finite values, or turn validation off (pyro.enable_validation(False)) "
                "to get NaN (for NaN) or -inf (for an infinity) in those rows."
            )
        if not is_real_support(self.support):
            super()._validate_sample(value)
            return
        # A finite value lies in the real support: only torch's shape checks are left
        # (its support check would test every entry for finiteness a second time).
        event_start = value.dim() - len(self.event_shape)
        if value.shape[event_start:] != self.event_shape:
            raise ValueError(
                f"The right-most size of value must match event_shape: {tuple(value.shape)} "
                f"vs {tuple(self.event_shape)}."
            )
        expected = self.batch_shape + self.event_shape
        for i, j in zip(reversed(value.shape), reversed(expected), strict=False):
            if i != 1 and j != 1 and i != j:
                raise ValueError(
                    "Value is not broadcastable with batch_shape+event_shape: "
                    f"{tuple(value.shape)} vs {tuple(expected)}."
                )

    def _log_prob(self, value: Tensor) -> Tensor:
        # torch's TransformedDistribution.log_prob, with one call per layer for the
        # package's transforms (their z and log-det together, from the pair cache when
        # ``value`` was drawn by the flow): under torch.compile, where the cache is off,
        # torch's two calls per layer (``inv``, then ``log_abs_det_jacobian``) would
        # run every conditioner twice.
        event_dim = len(self.event_shape)
        log_prob: Tensor | float = 0.0
        y = value
        for transform in reversed(self.transforms):
            if hasattr(transform, "cached_inverse_and_log_det"):
                x, log_det = transform.cached_inverse_and_log_det(y)
            else:
                x = transform.inv(y)
                log_det = transform.log_abs_det_jacobian(x, y)
            event_dim += transform.domain.event_dim - transform.codomain.event_dim
            log_prob = log_prob - _sum_rightmost(log_det, event_dim - transform.domain.event_dim)
            y = x
        base_event_dim = len(self.base_dist.event_shape)
        return log_prob + _sum_rightmost(self.base_dist.log_prob(y), event_dim - base_event_dim)

    def rsample_and_log_prob(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> tuple:
        """A reparametrized draw ``x`` and its ``log p(x)``, in one pass per layer (z -> x).

        The variational pattern ``x = rsample(); log_prob(x)`` without relying on the
        pair cache, so it stays one pass per layer under torch.compile (where an IAF's
        ``log_prob`` of its own draw would otherwise be its sequential inverse).

        Returns:
            ``x`` of shape ``sample_shape + batch_shape + (D,)`` and ``log p(x)`` of
            shape ``sample_shape + batch_shape``.

        Example:
            >>> d = iaf(dim=2, num_layers=2, hidden_dims=(8,))()
            >>> x, log_p = d.rsample_and_log_prob((5,))
            >>> torch.allclose(log_p, d.log_prob(x))
            True
        """
        x = self.base_dist.rsample(torch.Size(sample_shape))
        event_dim = len(self.base_dist.event_shape)
        log_prob = self.base_dist.log_prob(x)
        for transform in self.transforms:
            if hasattr(transform, "cached_forward_and_log_det"):
                y, log_det = transform.cached_forward_and_log_det(x)
            else:
                y = transform(x)
                log_det = transform.log_abs_det_jacobian(x, y)
            event_dim += transform.codomain.event_dim - transform.domain.event_dim
            log_prob = log_prob - _sum_rightmost(log_det, event_dim - transform.codomain.event_dim)
            x = y
        return x, log_prob

    def log_prob(self, value: Tensor) -> Tensor:
        """``log p(x)`` with shape ``value.shape[:-1]`` (broadcast with the batch shape)."""
        if not isinstance(value, Tensor):
            raise TypeError(f"expected the value to be a torch.Tensor, got {type(value).__name__}")
        if self._validate_args:
            self._validate_sample(value)
        # The dtype before any layer: the first one met may hold no floating-point state
        # (a permutation) and could not name the dtype the flow computes in.
        check_input_dtype("Flow", value, self.base_dist.mean.dtype, "value")
        if value.numel() == 0:
            # torch's reductions over the event cannot reshape an empty tensor.
            return value.new_zeros(torch.broadcast_shapes(value.shape[:-1], self.batch_shape))
        log_prob = self._log_prob(value)
        if not self._validate_args and value.dtype.is_floating_point:
            # The defined answer for non-finite rows, whatever each layer makes of them:
            # NaN where the row holds a NaN, -inf (zero density) where it holds +-inf.
            nan_rows = torch.isnan(value).any(-1)
            infinite_rows = torch.isinf(value).any(-1) & ~nan_rows
            log_prob = log_prob.masked_fill(infinite_rows, -float("inf"))
            log_prob = log_prob.masked_fill(nan_rows, float("nan"))
        return log_prob


#: The base distributions a :class:`Flow` (and every builder, ``base=...``) accepts.
FLOW_BASES: tuple[str, ...] = ("normal", "student_t")

#: The initial degrees of freedom of a ``base="student_t"`` flow (and of a
#: ``base="student_t"`` guide, :data:`pyro_nf.infer.autoguide.STUDENT_T_INIT_DF`): tails
#: a little heavier than the normal's, which training makes heavier or lighter.
FLOW_STUDENT_T_INIT_DF = 10.0

#: The largest degrees of freedom of a ``base="student_t"`` flow (then a normal to
#: within a few parts in a thousand): the tail index ``1 / df`` is floored at its inverse.
FLOW_STUDENT_T_MAX_DF = 1000.0


class Flow(nn.Module):
    r"""A normalizing flow: a base distribution and a transform stack.

    The base is the standard normal (``base="normal"``), or, for heavy-tailed data,
    independent Student-t coordinates with learned degrees of freedom
    (``base="student_t"``):

    .. math::
        p(z) = \prod_d \mathrm{StudentT}(z_d;\ \nu_d, 0, 1), \qquad
        \nu_d = 1 / (|\tau_d| + 1/\nu_{\max}),

    with the tail index :math:`\tau` a parameter (``base_tail``, starting at
    :math:`\nu_d = 10`; :math:`\nu_{\max} = 1000`). Affine layers and splines with
    linear tails keep the tails of their base (a Lipschitz map cannot make a normal
    heavy-tailed), so a normal-based flow cannot fit a power-law tail; a Student-t base
    can. The tail index, not :math:`\log \nu`, is the parameter because Adam moves a
    parameter by about the learning rate per step: from 10 to 3 degrees of freedom is
    0.23 in :math:`\tau` but 1.2 in :math:`\log \nu`, past the reach of 1000 steps
    at lr 1e-3 (``docs/benchmarks/density.md``).

    Arguments:
        transforms: the layers, applied in order from the base ``z`` to the data ``x``.
            Pyro transforms and conditional transforms are both accepted.
        dim: the event size D.
        context_dim: the context size for a conditional flow, 0 otherwise.
        base: ``"normal"`` (default) or ``"student_t"`` (:data:`FLOW_BASES`).

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

    def __init__(
        self,
        transforms: Sequence[Transform],
        dim: int,
        context_dim: int = 0,
        base: str = "normal",
    ) -> None:
        super().__init__()
        self.dim = integer("dim", dim)
        self.context_dim = integer("context_dim", context_dim, minimum=0)
        _check_base(base)
        self.base = base
        transforms = list(transforms)
        if context_dim > 0:
            self.transform = ConditionalComposeTransformModule(transforms)
        else:
            self.transform = ComposeTransformModule(transforms)
        self.register_buffer("base_loc", torch.zeros(dim))
        self.register_buffer("base_scale", torch.ones(dim))
        if base == "student_t":
            initial_tail = 1 / FLOW_STUDENT_T_INIT_DF - 1 / FLOW_STUDENT_T_MAX_DF
            self.base_tail = nn.Parameter(torch.full((dim,), initial_tail))

    @property
    def base_df(self) -> Tensor | None:
        """The base's degrees of freedom ``(D,)`` for ``base="student_t"``, else ``None``."""
        if self.base != "student_t":
            return None
        return 1 / (self.base_tail.abs() + 1 / FLOW_STUDENT_T_MAX_DF)

    @property
    def layers(self) -> list[Transform]:
        """The transforms from z to x."""
        if self.context_dim > 0:
            return list(self.transform.transforms)
        return list(self.transform.parts)

    def _check_context(self, context: Tensor | None) -> None:
        check_context("Flow", context, self.context_dim)

    def base_distribution(
        self, batch_shape: torch.Size | tuple[int, ...] = ()
    ) -> dist.Distribution:
        """The base over z, event shape ``(D,)``, on the flow's device and dtype: the
        standard normal, or independent ``StudentT(base_df, 0, 1)`` coordinates.

        It does not validate its arguments: the ``z`` it scores is computed by the flow
        from an ``x`` that :class:`FlowDistribution` has already checked, and a second
        support check per entry cost as much as a layer's elementwise work.
        """
        if self.base == "student_t":
            base = dist.StudentT(self.base_df, self.base_loc, self.base_scale, validate_args=False)
        else:
            base = dist.Normal(self.base_loc, self.base_scale, validate_args=False)
        if batch_shape:
            base = base.expand(torch.Size(batch_shape) + (self.dim,))
        return base.to_event(1)

    def forward(self, context: Tensor | None = None) -> FlowDistribution:
        """The distribution of x (conditioned on ``context`` for a conditional flow)."""
        self._check_context(context)
        if context is None:
            return FlowDistribution(self.base_distribution(), self.layers)
        layers = self.transform.condition(context).parts
        return FlowDistribution(self.base_distribution(context.shape[:-1]), layers)

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

    def rsample_and_log_prob(
        self, sample_shape: torch.Size | tuple[int, ...] = (), context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Reparametrized draws and their log-density in one pass per layer (z -> x).

        See :meth:`FlowDistribution.rsample_and_log_prob`; the form to compile.
        """
        return self(context).rsample_and_log_prob(torch.Size(sample_shape))

    def extra_repr(self) -> str:
        base = "" if self.base == "normal" else f", base={self.base!r}"
        return f"dim={self.dim}, context_dim={self.context_dim}{base}"


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


def renamed(value: object, old_value: object, name: str, old_name: str, default: object) -> object:
    """The value of an argument that also has an older spelling (a documented alias).

    Raises:
        ValueError: both spellings are given with different values.
    """
    if old_value is None:
        return value
    if value != default and value != old_value:
        raise ValueError(
            f"{old_name}= is the older spelling of {name}=; give one of them, got "
            f"{name}={value!r} and {old_name}={old_value!r}"
        )
    return old_value


#: A coupling function by name or instance, or one per layer.
CouplingSpec = str | CouplingFunction | Sequence[str | CouplingFunction]


def layer_coupling_functions(
    spec: CouplingSpec, coupling_kwargs: dict | None, num_layers: int
) -> list[CouplingFunction]:
    """One coupling function per layer from a builder's ``coupling_function`` argument.

    A name or a :class:`CouplingFunction` serves every layer (built once with
    ``coupling_kwargs``); a list or tuple gives layer ``i`` its entry ``i`` (for example
    ``["affine", "spline", "affine"]``), and then settings go into the entries
    themselves (``RationalQuadraticSpline(num_bins=8)``), not into ``coupling_kwargs``.

    Raises:
        ValueError: a list whose length is not ``num_layers``, or a list together with
            ``coupling_kwargs``.

    Example:
        >>> functions = layer_coupling_functions(["affine", "spline"], None, 2)
        >>> print(*(type(function).__name__ for function in functions))
        Affine RationalQuadraticSpline
    """
    if isinstance(spec, str | CouplingFunction):
        return [make_coupling_function(spec, **(coupling_kwargs or {}))] * num_layers
    entries = list(spec)
    if len(entries) != num_layers:
        raise ValueError(
            f"coupling_function has {len(entries)} entries but the flow has "
            f"num_layers={num_layers}; give one per layer, or one name for all"
        )
    if coupling_kwargs:
        raise ValueError(
            "coupling_kwargs apply to a single coupling function; with one per layer, "
            "pass configured instances instead (e.g. RationalQuadraticSpline(num_bins=8))"
        )
    return [make_coupling_function(entry) for entry in entries]


def _check_base(base: object) -> None:
    """A ``ValueError`` naming :data:`FLOW_BASES` unless ``base`` is one of them."""
    if base not in FLOW_BASES:
        raise ValueError(f"unknown base {base!r}; expected one of {FLOW_BASES}")


def _builder_args(
    dim: object,
    num_layers: object,
    context_dim: object,
    layers_name: str = "num_layers",
    base: object = "normal",
) -> tuple[int, int, int]:
    """The builders' shared arguments checked (``base`` too, before any layer is built)
    and as Python ints (NumPy integers accepted)."""
    _check_base(base)
    return (
        integer("dim", dim),
        integer(layers_name, num_layers),
        integer("context_dim", context_dim, minimum=0),
    )


def _layer_seeds(seed: int, num_layers: int) -> list[tuple[int, int]]:
    """Independent ``(order_seed, permutation_seed)`` pairs per layer, drawn from ``seed``.

    A random autoregressive order and the random permutation after the same layer must
    not come from one seed: they would be the same permutation, and undo each other.
    """
    generator = torch.Generator().manual_seed(integer("seed", seed, minimum=0))
    draws = torch.randint(0, 2**31 - 1, (num_layers, 2), generator=generator)
    return [(int(order), int(permutation)) for order, permutation in draws]


def realnvp(
    dim: int,
    num_layers: int = 4,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    coupling_function: CouplingSpec = "affine",
    coupling_kwargs: dict | None = None,
    activation: str = "relu",
    permutation: str | None = None,
    actnorm: bool = False,
    seed: int = 0,
    *,
    coupling: str | CouplingFunction | None = None,
    final_multiplier: float = 1.0,
    base: str = "normal",
) -> Flow:
    """A coupling flow (real NVP; NICE with ``coupling_function="additive"``; spline coupling).

    Layer ``i`` keeps one half of the coordinates and transforms the other half with
    ``h(z_B; g(z_A))``; consecutive layers swap the halves (the reference text's
    double layer; with ``permutation="reverse"`` the glue layer swaps them), so every
    coordinate is transformed. Direction: both z -> x
    (sampling) and x -> z (density) are one pass per layer.

    Arguments:
        dim: the event size D (at least 2).
        num_layers: the number of coupling layers.
        hidden_dims: hidden sizes of each layer's MLP conditioner.
        context_dim: context size for a conditional flow (0: unconditional).
        coupling_function: ``"affine"`` (real NVP), ``"additive"`` (NICE), ``"spline"``
            (rational-quadratic) or a :class:`CouplingFunction`; or a list of these, one
            per layer (:func:`layer_coupling_functions`).
        coupling_kwargs: keyword arguments of the coupling function (e.g.
            ``{"num_bins": 16, "bound": 5.0, "tails": "linear"}``, the spline's defaults).
        activation: the conditioners' activation.
        permutation: an extra glue layer after every coupling layer but the last:
            ``None`` (default), ``"reverse"``, ``"random"`` or ``"lu"``.
        actnorm: put an :class:`ActNorm` layer before every coupling layer.
        seed: seed of random permutations.
        coupling: the older spelling of ``coupling_function``, kept as an alias.
        final_multiplier: the constant each conditioner's final layer multiplies its
            weights by (1: none). It does not change the flow a seed builds, only how
            far an Adam step moves it (:class:`~pyro_nf.nn.MLP`); ``AutoFlow`` passes
            :data:`~pyro_nf.infer.autoguide.GUIDE_SMALL_FINAL_MULTIPLIER` for guides of
            up to 16 latents.
        base: the base distribution, ``"normal"`` or ``"student_t"`` (learned degrees
            of freedom, for heavy-tailed data; see :class:`Flow`).

    Returns:
        a :class:`Flow` whose ``transform`` maps z -> x.

    Example:
        >>> flow = realnvp(dim=2, num_layers=4, hidden_dims=(32, 32))
        >>> flow.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])
    """
    dim, num_layers, context_dim = _builder_args(dim, num_layers, context_dim, base=base)
    coupling_function = renamed(
        coupling_function, coupling, "coupling_function", "coupling", "affine"
    )
    if dim < 2:
        raise ValueError(
            f"a coupling flow needs dim >= 2 to split the input in two, got dim={dim}; "
            "use an autoregressive flow (maf/iaf) or a continuous flow (cnf) in one dimension"
        )
    functions = layer_coupling_functions(coupling_function, coupling_kwargs, num_layers)
    layers: list[Transform] = []
    for i, function in enumerate(functions):
        if actnorm:
            layers.append(ActNorm(dim))
        # Consecutive layers swap the halves. A reverse glue layer swaps them itself
        # (alternating the masks too would swap them back, and the same half would be
        # transformed in every layer), so then every layer transforms the first
        # ceil(D / 2) positions, which with their reverse image cover every coordinate.
        first_half = i % 2 == 0 if permutation != "reverse" else False
        layers.append(
            Coupling(
                half_mask(dim, first_half=first_half),
                function,
                hidden_dims=hidden_dims,
                context_dim=context_dim,
                activation=activation,
                final_multiplier=final_multiplier,
            )
        )
        glue = permutation_layer(permutation, dim, seed + i) if i < num_layers - 1 else None
        if glue is not None:
            layers.append(glue)
    return Flow(layers, dim, context_dim, base)


def cnf(
    dim: int,
    hidden_dims: Sequence[int] = (64, 64),
    num_layers: int = 1,
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
    *,
    num_blocks: int | None = None,
    final_init_scale: float = 1e-2,
    init: str = "preserve",
    state_scale: bool = False,
    dynamics: Callable[[], nn.Module] | None = None,
    base: str = "normal",
) -> Flow:
    r"""A continuous normalizing flow (FFJORD): ``num_layers`` ODE transforms in a row.

    Each block integrates :math:`dz/dt = f_k(z, t[, c])` over :math:`[0, T]` with the
    log-determinant :math:`\int_0^T \operatorname{tr}(\partial f_k/\partial z)\,dt`
    in the same solve (see :class:`~pyro_nf.transforms.ContinuousFlow`). Direction:
    z -> x (sampling) and x -> z (density) are one ODE solve per block each.

    Arguments:
        dim: the event size D (1 is allowed).
        hidden_dims: hidden sizes of each block's concat-squash dynamics network.
        num_layers: the number of ODE blocks.
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
        num_blocks: the older spelling of ``num_layers``, kept as an alias.
        final_init_scale: the scale of the last dynamics layer's initial weights
            (:class:`~pyro_nf.nn.ODEDynamics`; small: each block starts near the
            identity).
        init: the dynamics' hidden-layer initialisation, ``"preserve"`` (default: the
            input's variation reaches the last hidden layer) or ``"torch"`` (PyTorch's
            ``nn.Linear`` init, the default before; see :class:`~pyro_nf.nn.ODEDynamics`).
        state_scale: fields of the form :math:`s(z, t) \odot z + m(z, t)`, which scale
            each coordinate by a factor that depends on the others (a funnel's
            :math:`e^{v/2}`; see :class:`~pyro_nf.nn.ODEDynamics`). ``AutoFlow``'s cnf
            guides use them.
        dynamics: a factory called once per block for its vector field, e.g.
            ``lambda: ODEDynamics(2, (64, 64, 64), activation="softplus")``; it must
            take ``(t, z)`` (and the context when ``context_dim > 0``) and have
            ``dim`` (and ``context_dim``) attributes equal to the flow's when it has
            them. With it, ``hidden_dims``, ``activation``, ``final_init_scale``,
            ``init`` and ``state_scale`` are not used.
        base: the base distribution, ``"normal"`` or ``"student_t"`` (learned degrees
            of freedom, for heavy-tailed data; see :class:`Flow`).

    Returns:
        a :class:`Flow` whose ``transform`` maps z -> x.

    Example:
        >>> flow = cnf(dim=2, hidden_dims=(16, 16), rtol=1e-4, atol=1e-4)
        >>> flow.log_prob(torch.randn(10, 2)).shape
        torch.Size([10])
        >>> from pyro_nf.nn import ODEDynamics
        >>> flow = cnf(2, num_layers=2, dynamics=lambda: ODEDynamics(2, (8, 8, 8)))
        >>> flow.layers[1].dynamics.hidden_dims
        (8, 8, 8)
    """
    from pyro_nf.nn.dynamics import ODEDynamics

    num_layers = renamed(num_layers, num_blocks, "num_layers", "num_blocks", 1)
    dim, num_layers, context_dim = _builder_args(dim, num_layers, context_dim, base=base)
    layers: list[Transform] = []
    for _ in range(num_layers):
        if actnorm:
            layers.append(ActNorm(dim))
        if dynamics is None:
            field = ODEDynamics(
                dim,
                hidden_dims,
                context_dim,
                activation,
                final_init_scale=final_init_scale,
                init=init,
                state_scale=state_scale,
            )
        else:
            field = dynamics()
        layers.append(
            ContinuousFlow(
                dim,
                field,
                context_dim=context_dim,
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
    return Flow(layers, dim, context_dim, base)


def _autoregressive_flow(
    layer_class: type[Autoregressive],
    dim: int,
    num_layers: int,
    hidden_dims: Sequence[int],
    context_dim: int,
    coupling_function: CouplingSpec,
    coupling_kwargs: dict | None,
    permutation: str | None,
    order: str | Sequence[int] | Tensor,
    activation: str,
    residual: bool,
    seed: int,
    final_multiplier: float,
    base: str,
) -> Flow:
    dim, num_layers, context_dim = _builder_args(dim, num_layers, context_dim, base=base)
    functions = layer_coupling_functions(coupling_function, coupling_kwargs, num_layers)
    layers: list[Transform] = []
    # A fixed permutation between two layers is folded into the orders of the layers
    # after it: with u = v[p], a layer of order pi on u is the layer of order p[pi] on v
    # (its inputs relabelled) followed by the same permutation, so the stack keeps its
    # distribution and loses a layer per permutation (a gather, its cache and its
    # backward on every pass). ``carried`` is the product of the permutations met so
    # far; one Permutation layer at the end applies it if it is not the identity.
    carried: Tensor | None = None
    for i, (order_seed, permutation_seed) in enumerate(_layer_seeds(seed, num_layers)):
        layer_order = autoregressive_order(order, dim, order_seed)
        if carried is not None:
            layer_order = carried[layer_order]
        layers.append(
            layer_class(
                dim,
                functions[i],
                hidden_dims=hidden_dims,
                context_dim=context_dim,
                order=layer_order,
                activation=activation,
                residual=residual,
                final_multiplier=final_multiplier,
            )
        )
        last = i == num_layers - 1
        glue = None if last else permutation_layer(permutation, dim, permutation_seed)
        if isinstance(glue, Permutation):
            p = glue.permutation
            carried = p if carried is None else carried[p]
        elif glue is not None:
            _flush_permutation(layers, carried)
            carried = None
            layers.append(glue)
    _flush_permutation(layers, carried)
    return Flow(layers, dim, context_dim, base)


def _flush_permutation(layers: list[Transform], carried: Tensor | None) -> None:
    """Append ``Permutation(carried)`` unless it is the identity (or nothing was carried)."""
    if carried is not None and not torch.equal(carried, torch.arange(carried.numel())):
        layers.append(Permutation(carried))


def maf(
    dim: int,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    coupling_function: CouplingSpec = "affine",
    coupling_kwargs: dict | None = None,
    permutation: str | None = "reverse",
    order: str | Sequence[int] | Tensor = "natural",
    activation: str = "relu",
    residual: bool = False,
    seed: int = 0,
    *,
    coupling: str | CouplingFunction | None = None,
    final_multiplier: float = 1.0,
    base: str = "normal",
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
        coupling_function: ``"affine"``, ``"additive"``, ``"spline"`` (rational-quadratic) or a
            :class:`CouplingFunction`; or a list of these, one per layer (e.g.
            ``["affine", "spline", "affine", "spline", "affine"]``: spline layers split a
            coordinate's mass by its own value, affine ones scale it; see
            :func:`layer_coupling_functions` and ``docs/benchmarks/posteriors.md``).
        coupling_kwargs: keyword arguments of the coupling function (e.g.
            ``{"num_bins": 16, "bound": 5.0, "tails": "linear"}``, the spline's defaults).
        permutation: a glue layer after every layer but the last: ``"reverse"``
            (default), ``"random"``, ``"lu"`` or ``None``. A fixed permutation
            (``"reverse"``, ``"random"``) is folded into the autoregressive orders of the
            layers after it: the same distribution without a layer per permutation (the
            default stack alternates the natural and the reverse order; one
            :class:`~pyro_nf.transforms.Permutation` ends the stack when the product of
            the permutations is not the identity).
        order: the autoregressive order inside each layer: ``"natural"`` (default),
            ``"reverse"``, ``"random"`` (seeded per layer) or an explicit permutation.
        activation: the conditioners' activation.
        residual: residual hidden layers in the conditioners (equal hidden sizes).
        seed: seed of random orders and permutations (independent streams per layer).
        coupling: the older spelling of ``coupling_function``, kept as an alias.
        final_multiplier: the constant each MADE's final layer multiplies its weights
            by (1: none). It does not change the flow a seed builds, only how far an
            Adam step moves it (:class:`~pyro_nf.nn.MADE`); ``AutoFlow`` passes
            :data:`~pyro_nf.infer.autoguide.GUIDE_SMALL_FINAL_MULTIPLIER` for guides of up to 16
            latents.
        base: the base distribution, ``"normal"`` or ``"student_t"`` (learned degrees
            of freedom, for heavy-tailed data; see :class:`Flow`).

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
        renamed(coupling_function, coupling, "coupling_function", "coupling", "affine"),
        coupling_kwargs,
        permutation,
        order,
        activation,
        residual,
        seed,
        final_multiplier,
        base,
    )


def iaf(
    dim: int,
    num_layers: int = 5,
    hidden_dims: Sequence[int] = (64, 64),
    context_dim: int = 0,
    coupling_function: CouplingSpec = "affine",
    coupling_kwargs: dict | None = None,
    permutation: str | None = "reverse",
    order: str | Sequence[int] | Tensor = "natural",
    activation: str = "relu",
    residual: bool = False,
    seed: int = 0,
    *,
    coupling: str | CouplingFunction | None = None,
    final_multiplier: float = 1.0,
    base: str = "normal",
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
        renamed(coupling_function, coupling, "coupling_function", "coupling", "affine"),
        coupling_kwargs,
        permutation,
        order,
        activation,
        residual,
        seed,
        final_multiplier,
        base,
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
