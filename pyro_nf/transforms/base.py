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
import torch.nn.modules.module as torch_module
from pyro.distributions.conditional import ConditionalTransform
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints
from torch.distributions.transforms import _InverseTransform

from pyro_nf._validation import check_context, check_input_dtype, integer

__all__ = ["FlowTransform", "ConditionedTransform", "PairCache", "PairCacheMixin"]

# Bumped whenever a module inside some transform's memoized tree gains or replaces a
# submodule, parameter or buffer (global registration hooks, rare after construction):
# the memos are then rebuilt and every cache stamp (which holds the counter) is stale,
# so ``layer.conditioner.layers[0] = nn.Linear(...)`` is seen.
# Modules outside every tree (say a ``ModuleList`` slice made in a forward pass) do not
# count, so eager passes and compiled traces never touch the counter.
_module_tree_generation = 0
_TREE_MEMBER = "_pyro_nf_tree_member"


def _count_module_registration(module: torch.nn.Module, name: str, submodule: object) -> None:
    if module.__dict__.get(_TREE_MEMBER):
        global _module_tree_generation
        _module_tree_generation += 1


# A new submodule, parameter or buffer (also one that replaces another: its version
# counter starts again at 0, so versions alone would not see the change).
torch_module.register_module_module_registration_hook(_count_module_registration)
torch_module.register_module_parameter_registration_hook(_count_module_registration)
torch_module.register_module_buffer_registration_hook(_count_module_registration)


def _walk_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``module`` and all its submodules, depth first.

    Unlike ``nn.Module.modules()`` it keeps no set of seen modules: Pyro's
    ``TransformModule.__hash__`` cannot be traced by torch.compile. A module shared at
    two places appears twice, which the version stamp does not mind.
    """
    found = [module]
    for child in module._modules.values():
        if child is not None:
            found.extend(_walk_modules(child))
    return found


def _dynamo_is_compiling() -> bool:
    return torch._dynamo.is_compiling()


#: True while torch.compile (dynamo) traces the caller. Bound once: it is asked several
#: times per layer and pass, and a wrapper around it cost more than the question.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _dynamo_is_compiling)


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

    Example:
        >>> cache = PairCache()
        >>> z, x = torch.zeros(2), torch.ones(2)
        >>> cache.store(z, x, torch.tensor(0.0), state=("parameter versions",))
        >>> cache.entry_for(0, z, ("parameter versions",))[1] is x
        True
        >>> cache.entry_for(0, z, ("after an optimizer step",)) is None
        True
    """

    def __init__(self) -> None:
        self._entry: tuple[Tensor, Tensor, Tensor, tuple] | None = None
        self._token: object | None = None

    def clear(self) -> None:
        self._entry = None

    def _forget_on_backward(self, tensors: tuple[Tensor, ...]) -> None:
        # The hook lives on the cached tensors, so it must not refer to them (nor to the
        # cache, strongly): a closure over the entry would make a cycle through the
        # autograd graph that Python's collector cannot see, and every training step
        # would keep its batch alive. A plain token names the entry instead.
        token = self._token = object()
        cache = weakref.ref(self)

        def forget(grad: Tensor) -> None:
            owner = cache()
            if owner is not None and owner._token is token:
                owner._entry = None

        for tensor in tensors:
            if tensor.grad_fn is not None:
                tensor.register_hook(forget)

    @staticmethod
    def _stamp(z: Tensor, x: Tensor, state: tuple) -> tuple:
        # An entry made outside a torch.jit trace is a constant to the tracer (it fails
        # on one that requires grad), so an entry made outside a trace is not used in one.
        tracing = torch.jit.is_tracing()
        return (_version_of(z), _version_of(x), torch.is_grad_enabled(), tracing, state)

    def store(self, z: Tensor, x: Tensor, log_det: Tensor, state: tuple) -> None:
        self._entry = (z, x, log_det, self._stamp(z, x, state))
        if torch.is_grad_enabled():
            self._forget_on_backward((z, x, log_det))

    def entry_for(self, index: int, value: Tensor, state: tuple) -> tuple | None:
        """The entry ``(z, x, log_det, stamp)`` if ``value`` is its z (``index`` 0) or x (1).

        ``None`` unless the entry is current for ``state``. The identity test comes
        first: most lookups are for a tensor the cache has never seen (a fresh draw),
        and they need no stamp.
        """
        entry = self._entry
        if entry is None or entry[index] is not value:
            return None
        z, x, _, stamp = entry
        if stamp != self._stamp(z, x, state) or None in stamp[:2]:
            return None
        return entry


class PairCacheMixin:
    """The cache plumbing shared by :class:`FlowTransform` and :class:`ConditionedTransform`.

    The owner keeps a :class:`PairCache` in ``_pair_cache``. The cache is always safe to
    keep (it checks versions), so ``with_cache`` answers with the transform itself, and
    copies, pickles and ``torch.save`` drop it: cached tensors may hold autograd graphs,
    which cannot be copied.
    """

    _pair_cache: PairCache

    def with_cache(self, cache_size: int = 1) -> Transform:
        return self

    def clear_cache(self) -> None:
        self._pair_cache.clear()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pair_cache"] = PairCache()
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        state.pop("_state_modules", None)
        return state


class FlowTransform(PairCacheMixin, TransformModule, ConditionalTransform):
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
    #: True for a transform whose first pass sets parameters from the data (ActNorm).
    initializes_from_data = False

    def __init__(self, dim: int, context_dim: int = 0, cache_size: int = 1) -> None:
        dim = integer("dim", dim)
        context_dim = integer("context_dim", context_dim, minimum=0)
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

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating parameter or buffer (``None`` if there is none)."""
        for tensor in self._state_tensors():
            if tensor.dtype.is_floating_point:
                return tensor.dtype
        return None

    def check_input(self, value: Tensor, name: str = "input") -> None:
        """Check that ``value`` is a tensor of shape ``(..., dim)`` in the transform's dtype.

        Raises:
            TypeError: not a tensor, not floating point, or another dtype than the
                transform's parameters (see :func:`~pyro_nf._validation.check_input_dtype`).
            ValueError: the last dimension is not ``dim``.
        """
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
        check_input_dtype(type(self).__name__, value, self.compute_dtype, name)

    def check_context(self, context: Tensor | None) -> None:
        """Check ``context`` against ``context_dim`` (bind one with :meth:`condition`)."""
        check_context(type(self).__name__, context, self.context_dim)
        if context is not None:
            check_input_dtype(type(self).__name__, context, self.compute_dtype, "context")

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

    def _state_tensors(self) -> tuple[Tensor, ...]:
        """Every parameter and buffer of the transform's module tree, kept until it changes.

        Walking the module tree is the expensive part of ``parameters()``; the tree
        rarely changes after construction, and a new or replaced submodule, parameter or
        buffer inside it bumps the generation (registration hooks), so the flat tuple
        stays right until the next rebuild. Under torch.compile a trace runs once and
        keeps no memo.
        """
        memo = None if _is_compiling() else self.__dict__.get("_state_modules")
        if memo is not None and memo[0] == _module_tree_generation:
            return memo[1]
        modules = _walk_modules(self)
        tensors = tuple(
            tensor
            for module in modules
            for tensors in (module._parameters, module._buffers)
            for tensor in tensors.values()
            if tensor is not None
        )
        if not _is_compiling():
            for module in modules:
                module.__dict__[_TREE_MEMBER] = True
            self.__dict__["_state_modules"] = (_module_tree_generation, tensors)
        return tensors

    def state_versions(self) -> tuple:
        """Version counters of all parameters and buffers: part of every cache stamp."""
        tensors = self._state_tensors()
        try:
            return tuple([tensor._version for tensor in tensors])
        except RuntimeError:  # an inference tensor has no version counter
            return tuple(_version_of(tensor) for tensor in tensors)

    def _cache_state(self, context: Tensor | None) -> tuple:
        context_key = None if context is None else (id(context), _version_of(context))
        return (_module_tree_generation, self.state_versions(), context_key)

    def _state_after_pass(self, state_before: tuple, context: Tensor | None) -> tuple:
        # Only a pass that initializes parameters from the data (ActNorm) changes the
        # state; every other pass is a read, so the stamp taken before it still holds.
        return self._cache_state(context) if self.initializes_from_data else state_before

    # ----------------------------------------------------------------- cached passes
    def _cached_pass(
        self, value: Tensor, context: Tensor | None, cache: PairCache, inverse: bool
    ) -> tuple[Tensor, Tensor]:
        """One pass z -> x (x -> z with ``inverse``) and its log-det, from the cache if it can.

        A hit needs no input check: a cached tensor was checked (or computed) when its
        pair was stored.
        """
        run = self.inverse_and_log_det if inverse else self.forward_and_log_det
        name = "input x" if inverse else "input z"
        if self._cache_size == 0 or _is_compiling():
            self._check(value, context, name)
            return run(value, context)
        state = self._cache_state(context)
        entry = cache.entry_for(int(inverse), value, state)
        if entry is not None:
            return entry[1 - int(inverse)], entry[2]
        self._check(value, context, name)
        output, log_det = run(value, context)
        z, x = (output, value) if inverse else (value, output)
        cache.store(z, x, log_det, self._state_after_pass(state, context))
        return output, log_det

    def _cached_log_det(
        self, z: Tensor, x: Tensor, context: Tensor | None, cache: PairCache
    ) -> Tensor:
        if self._cache_size == 1 and not _is_compiling():
            entry = cache.entry_for(0, z, self._cache_state(context))
            if entry is not None and entry[1] is x:
                return entry[2]
        if self.cheap_inverse:
            self._check(x, context, "input x")
            return self.inverse_and_log_det(x, context)[1]
        self._check(z, context, "input z")
        return self.forward_and_log_det(z, context)[1]

    # ----------------------------------------------------------------- Transform API
    def __call__(self, z: Tensor) -> Tensor:
        return self._cached_pass(z, None, self._pair_cache, inverse=False)[0]

    def _inv_call(self, x: Tensor) -> Tensor:
        return self._cached_pass(x, None, self._pair_cache, inverse=True)[0]

    def cached_forward_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log |det dx/dz|)`` of ``t(z)`` in one call, through the pair cache.

        What ``x = t(z)`` followed by ``t.log_abs_det_jacobian(z, x)`` gives, in one
        call (and under torch.compile, where the cache is off, in one pass instead of
        two).
        """
        return self._cached_pass(z, None, self._pair_cache, inverse=False)

    def forward_without_log_det(self, z: Tensor) -> Tensor:
        """z -> x, shape ``(..., D)`` to ``(..., D)``, for a draw whose log-det is never read.

        The path-gradient draw (:class:`~pyro_nf.infer.PathDerivativeDistribution`)
        scores its draws with detached parameters, so the pass's log-det is never used.
        Here it is ``self(z)``: the cached pass, whose log-det costs most transforms
        nothing extra. :class:`~pyro_nf.transforms.ContinuousFlow` solves the state
        alone, without the trace of the field's Jacobian.
        """
        return self(z)

    def cached_inverse_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log |det dx/dz|)`` of ``t.inv(x)`` in one call, through the pair cache."""
        return self._cached_pass(x, None, self._pair_cache, inverse=True)

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

    def extra_repr(self) -> str:
        text = f"dim={self.dim}"
        return text + (f", context_dim={self.context_dim}" if self.is_conditional else "")

    def __repr__(self) -> str:
        # One line that says what the layer is (torch's Transform.__repr__ would print
        # ``Coupling()``, nn.Module's every submodule).
        return f"{type(self).__name__}({self.extra_repr()})"


def describe_order(order: Tensor) -> str:
    """``"natural"``, ``"reverse"`` or the explicit list, for reprs of orders and permutations.

    Example:
        >>> describe_order(torch.tensor([2, 1, 0])), describe_order(torch.tensor([1, 0, 2]))
        ('reverse', '[1, 0, 2]')
    """
    values = order.tolist()
    if values == list(range(len(values))):
        return "natural"
    if values == list(range(len(values) - 1, -1, -1)):
        return "reverse"
    return str(values)


class InverseFlowTransform(_InverseTransform, ConditionalTransform):
    """The inverse x -> z of a :class:`FlowTransform`, conditional when the transform is."""

    def condition(self, context: Tensor) -> Transform:
        return self._inv.condition(context).inv


class ConditionedTransform(PairCacheMixin, Transform):
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
        return self.transform._cached_pass(z, self.context, self._pair_cache, inverse=False)[0]

    def _inv_call(self, x: Tensor) -> Tensor:
        return self.transform._cached_pass(x, self.context, self._pair_cache, inverse=True)[0]

    def cached_forward_and_log_det(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log |det dx/dz|)`` for the bound context, through the pair cache."""
        return self.transform._cached_pass(z, self.context, self._pair_cache, inverse=False)

    def cached_inverse_and_log_det(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log |det dx/dz|)`` for the bound context, through the pair cache."""
        return self.transform._cached_pass(x, self.context, self._pair_cache, inverse=True)

    def _call(self, z: Tensor) -> Tensor:
        return self.transform.forward_and_log_det(z, self.context)[0]

    def _inverse(self, x: Tensor) -> Tensor:
        return self.transform.inverse_and_log_det(x, self.context)[0]

    def log_abs_det_jacobian(self, z: Tensor, x: Tensor) -> Tensor:
        return self.transform._cached_log_det(z, x, self.context, self._pair_cache)

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
