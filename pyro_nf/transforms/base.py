"""The base class of every transform in :mod:`pyro_nf`, and its cache.

Direction convention (Pyro's): a transform maps the base (latent) space ``z`` to the
data space ``x``. ``t(z)`` is sampling, ``t.inv(x)`` is density evaluation and
``t.log_abs_det_jacobian(z, x)`` is ``log |det dx/dz|``.

A subclass implements two methods that return the output *and* the log-determinant
of one pass, :meth:`FlowTransform.forward_and_log_det` (z -> x) and
:meth:`FlowTransform.inverse_and_log_det` (x -> z). The base class adds the rest:
input validation, an optional context, and a cache of the last ``(z, x, log_det)``
triple so that ``x = t(z)`` followed by ``t.log_abs_det_jacobian(z, x)`` (or
``z = t.inv(x)`` followed by the same call, the pattern of
``TransformedDistribution.log_prob``) never runs a second pass.
"""

from __future__ import annotations

import weakref

import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints
from torch.distributions.transforms import _InverseTransform

__all__ = ["FlowTransform", "ConditionedTransform", "PairCache"]


def _version_of(tensor: Tensor) -> int | None:
    """The in-place modification counter of ``tensor`` (``None`` for inference tensors)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class PairCache:
    """Remembers the last ``(z, x, log_det)`` triple of a transform.

    Pyro's own transforms key their cache on tensor identity alone, so full-batch
    training that passes the same data tensor at every step gets the value computed
    with the *previous* parameters (and its stale autograd graph). This cache also
    records a *stamp*: the version counters of the inputs and of every parameter and
    buffer, the context, and whether gradients were being recorded. An optimizer step,
    ``load_state_dict`` or an in-place edit of the input bumps a version counter, so the
    entry no longer matches and the value is recomputed.

    A backward pass through a cached tensor frees its graph, so the cache also forgets
    the entry as soon as a gradient flows through any of its tensors (a tensor hook):
    computing the same ``log_prob`` twice with a ``backward()`` after each, without an
    optimizer step in between, never meets "backward through the graph a second time".
    """

    def __init__(self) -> None:
        self._entry: tuple[Tensor, Tensor, Tensor, tuple] | None = None

    def clear(self) -> None:
        self._entry = None

    def _forget_on_backward(self, tensors: tuple[Tensor, ...]) -> None:
        entry = self._entry
        cache = weakref.ref(self)  # no reference cycle through the tensors' hooks

        def forget(grad: Tensor) -> None:
            owner = cache()
            if owner is not None and owner._entry is entry:
                owner._entry = None

        for tensor in tensors:
            if tensor.grad_fn is not None:
                tensor.register_hook(forget)

    @staticmethod
    def _stamp(z: Tensor, x: Tensor, state: tuple) -> tuple:
        return (_version_of(z), _version_of(x), torch.is_grad_enabled(), state)

    def store(self, z: Tensor, x: Tensor, log_det: Tensor, state: tuple) -> None:
        self._entry = (z, x, log_det, self._stamp(z, x, state))
        if torch.is_grad_enabled():
            self._forget_on_backward((z, x, log_det))

    def _valid_entry(self, state: tuple) -> tuple[Tensor, Tensor, Tensor] | None:
        if self._entry is None:
            return None
        z, x, log_det, stamp = self._entry
        if stamp != self._stamp(z, x, state) or None in stamp[:2]:
            return None
        return z, x, log_det

    def lookup_forward(self, z: Tensor, state: tuple) -> Tensor | None:
        entry = self._valid_entry(state)
        return entry[1] if entry is not None and entry[0] is z else None

    def lookup_inverse(self, x: Tensor, state: tuple) -> Tensor | None:
        entry = self._valid_entry(state)
        return entry[0] if entry is not None and entry[1] is x else None

    def lookup_log_det(self, z: Tensor, x: Tensor, state: tuple) -> Tensor | None:
        entry = self._valid_entry(state)
        if entry is not None and entry[0] is z and entry[1] is x:
            return entry[2]
        return None


class FlowTransform(TransformModule, ConditionalTransform):
    """Base class of the package's transforms: a ``TransformModule`` on vectors.

    Subclasses implement :meth:`forward_and_log_det` (z -> x) and
    :meth:`inverse_and_log_det` (x -> z); each returns the output and
    ``log |det dx/dz|`` with the batch shape. Subclasses set ``cheap_inverse = True``
    when x -> z is the cheap direction (MAF), so that a log-determinant that is not in
    the cache is recomputed from ``x`` instead of ``z``.

    With ``context_dim > 0`` the transform is conditional: the transform itself
    cannot be called; :meth:`condition` binds a context of shape
    ``(..., context_dim)`` and returns a :class:`ConditionedTransform`. This is the
    interface of Pyro's ``ConditionalTransformModule``, so the same class serves both
    uses. An unconditional transform's ``condition`` returns the transform itself.

    Arguments:
        dim: the event size D; inputs have shape ``(..., D)``.
        context_dim: the size of the context vector, 0 for an unconditional transform.
        cache_size: 1 (default) keeps the last pair and its log-determinant, 0 keeps
            nothing.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    cheap_inverse = False

    def __init__(self, dim: int, context_dim: int = 0, cache_size: int = 1) -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim must be a non-negative integer, got {context_dim!r}")
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
        super().__init__(cache_size=cache_size)
        self.dim = dim
        self.context_dim = context_dim
        self._pair_cache = PairCache()

    # ----------------------------------------------------------------- to implement
    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """z -> x: returns ``x`` of shape ``(..., D)`` and ``log |det dx/dz|`` of shape ``(...)``."""
        raise NotImplementedError

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x -> z: returns ``z`` of shape ``(..., D)`` and ``log |det dx/dz|`` of shape ``(...)``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- validation
    @property
    def is_conditional(self) -> bool:
        return self.context_dim > 0

    def check_input(self, value: Tensor, name: str = "input") -> None:
        """Raise ``ValueError`` unless ``value`` is a tensor of shape ``(..., dim)``."""
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{type(self).__name__}: expected the {name} to be a torch.Tensor, "
                f"got {type(value).__name__}"
            )
        if value.dim() == 0 or value.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: expected the {name} to have last dimension "
                f"{self.dim}, got shape {tuple(value.shape)}"
            )

    def check_context(self, context: Tensor | None) -> None:
        """Raise ``ValueError`` unless ``context`` fits ``context_dim``."""
        name = type(self).__name__
        if not self.is_conditional:
            if context is not None:
                raise ValueError(f"{name} is unconditional (context_dim=0) but got a context")
            return
        if context is None:
            raise ValueError(
                f"{name} is conditional (context_dim={self.context_dim}): call "
                f".condition(context) with a context of shape (..., {self.context_dim})"
            )
        if not isinstance(context, Tensor):
            raise TypeError(f"{name}: expected the context to be a torch.Tensor")
        if context.dim() == 0 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"{name}: expected a context with last dimension {self.context_dim}, "
                f"got shape {tuple(context.shape)}"
            )

    def _check(self, value: Tensor, context: Tensor | None, name: str) -> None:
        self.check_input(value, name)
        self.check_context(context)
        if context is not None:
            try:
                torch.broadcast_shapes(value.shape[:-1], context.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"{type(self).__name__}: the batch shape of the context "
                    f"{tuple(context.shape[:-1])} does not broadcast with the batch shape "
                    f"of the {name} {tuple(value.shape[:-1])}"
                ) from None

    def state_versions(self) -> tuple:
        """Version counters of all parameters and buffers: part of every cache stamp."""
        modules = self.__dict__.get("_state_modules")
        if modules is None:
            # Walking the module tree is the expensive part of ``parameters()``; the
            # tree is fixed after construction, the tensors in it are read every time.
            modules = self.__dict__["_state_modules"] = tuple(self.modules())
        return tuple(
            _version_of(tensor)
            for module in modules
            for tensors in (module._parameters, module._buffers)
            for tensor in tensors.values()
            if tensor is not None
        )

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, torch.nn.Module):
            self.__dict__.pop("_state_modules", None)
        super().__setattr__(name, value)

    def _cache_state(self, context: Tensor | None) -> tuple:
        context_key = None if context is None else (id(context), _version_of(context))
        return (self.state_versions(), context_key)

    # ----------------------------------------------------------------- cached passes
    def _cached_forward(self, z: Tensor, context: Tensor | None, cache: PairCache) -> Tensor:
        self._check(z, context, "input z")
        if self._cache_size == 0:
            return self.forward_and_log_det(z, context)[0]
        state = self._cache_state(context)
        x = cache.lookup_forward(z, state)
        if x is None:
            x, log_det = self.forward_and_log_det(z, context)
            # The state is read again: a pass may initialize parameters (ActNorm).
            cache.store(z, x, log_det, self._cache_state(context))
        return x

    def _cached_inverse(self, x: Tensor, context: Tensor | None, cache: PairCache) -> Tensor:
        self._check(x, context, "input x")
        if self._cache_size == 0:
            return self.inverse_and_log_det(x, context)[0]
        state = self._cache_state(context)
        z = cache.lookup_inverse(x, state)
        if z is None:
            z, log_det = self.inverse_and_log_det(x, context)
            cache.store(z, x, log_det, self._cache_state(context))
        return z

    def _cached_log_det(
        self, z: Tensor, x: Tensor, context: Tensor | None, cache: PairCache
    ) -> Tensor:
        if self._cache_size == 1:
            log_det = cache.lookup_log_det(z, x, self._cache_state(context))
            if log_det is not None:
                return log_det
        if self.cheap_inverse:
            self._check(x, context, "input x")
            return self.inverse_and_log_det(x, context)[1]
        self._check(z, context, "input z")
        return self.forward_and_log_det(z, context)[1]

    # ----------------------------------------------------------------- Transform API
    def __call__(self, z: Tensor) -> Tensor:
        return self._cached_forward(z, None, self._pair_cache)

    def _inv_call(self, x: Tensor) -> Tensor:
        return self._cached_inverse(x, None, self._pair_cache)

    def _call(self, z: Tensor) -> Tensor:
        self._check(z, None, "input z")
        return self.forward_and_log_det(z)[0]

    def _inverse(self, x: Tensor) -> Tensor:
        self._check(x, None, "input x")
        return self.inverse_and_log_det(x)[0]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        """``log |det dx/dz|`` for a pair ``x = t(z)``, shape ``z.shape[:-1]``."""
        return self._cached_log_det(z, x, None, self._pair_cache)

    @property
    def inv(self) -> Transform:
        """The inverse transform x -> z; for a conditional transform it has ``.condition``."""
        if self._inv is None:
            self._inv = InverseFlowTransform(self)
        return self._inv

    def condition(self, context: Tensor) -> Transform:
        """Bind a context: returns a transform z -> x for this context (self if unconditional)."""
        if not self.is_conditional:
            return self
        self.check_context(context)
        return ConditionedTransform(self, context)

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        # The cache is always safe to keep (it checks parameter versions), so a request
        # for a cached copy is answered by the transform itself.
        return self

    def clear_cache(self) -> None:
        self._pair_cache.clear()

    def __getstate__(self) -> dict:
        # Cached tensors may hold autograd graphs, which cannot be copied or pickled.
        state = super().__getstate__()
        state["_pair_cache"] = PairCache()
        state["_cached_x_y"] = (None, None)
        state.pop("_state_modules", None)
        return state

    def extra_repr(self) -> str:
        text = f"dim={self.dim}"
        return text + (f", context_dim={self.context_dim}" if self.is_conditional else "")


class InverseFlowTransform(_InverseTransform, ConditionalTransform):
    """The inverse x -> z of a :class:`FlowTransform`, conditional when the transform is."""

    def condition(self, context: Tensor) -> Transform:
        return self._inv.condition(context).inv


class ConditionedTransform(Transform):
    """A conditional :class:`FlowTransform` bound to one context (a thin binding).

    It holds no parameters of its own: every pass calls the parent's
    ``forward_and_log_det`` / ``inverse_and_log_det`` with the bound context, and it
    keeps its own cache of the last pair.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, transform: FlowTransform, context: Tensor) -> None:
        super().__init__(cache_size=transform._cache_size)
        self.transform = transform
        self.context = context
        self._pair_cache = PairCache()

    def __call__(self, z: Tensor) -> Tensor:
        return self.transform._cached_forward(z, self.context, self._pair_cache)

    def _inv_call(self, x: Tensor) -> Tensor:
        return self.transform._cached_inverse(x, self.context, self._pair_cache)

    def _call(self, z: Tensor) -> Tensor:
        return self.transform.forward_and_log_det(z, self.context)[0]

    def _inverse(self, x: Tensor) -> Tensor:
        return self.transform.inverse_and_log_det(x, self.context)[0]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        return self.transform._cached_log_det(z, x, self.context, self._pair_cache)

    def with_cache(self, cache_size: int = 1) -> ConditionedTransform:
        return self

    def clear_cache(self) -> None:
        self._pair_cache.clear()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pair_cache"] = PairCache()
        return state

    def __repr__(self) -> str:
        return (
            f"ConditionedTransform({self.transform!r}, context shape {tuple(self.context.shape)})"
        )


def broadcast_context(value: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Broadcast the batch shapes of ``value`` (..., D) and ``context`` (..., C)."""
    if context is None:
        return value, None
    batch = torch.broadcast_shapes(value.shape[:-1], context.shape[:-1])
    return value.expand(batch + value.shape[-1:]), context.expand(batch + context.shape[-1:])


def zeros_like_batch(value: Tensor) -> Tensor:
    """A zero log-determinant for a volume-preserving pass: shape ``value.shape[:-1]``."""
    return value.new_zeros(value.shape[:-1])
