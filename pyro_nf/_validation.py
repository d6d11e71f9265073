"""One home for argument and input checks, with one wording and one exception per mistake.

- a value of the wrong *type* (a float where an integer is needed, a list where a tensor
  is needed, an integer tensor where a floating one is needed): :class:`TypeError`;
- a value of the right type but outside what is allowed (``dim=0``, a context of the
  wrong size, a float64 input to a float32 flow): :class:`ValueError`.

Every message names what was expected and what was given. NumPy integers count as
integers everywhere (``dim=np.int64(3)`` is ``dim=3``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_context",
    "check_input_dtype",
    "concat_context",
    "integer",
    "positive_number",
    "layer_sizes",
]


def integer(name: str, value: object, minimum: int = 1) -> int:
    """``value`` as a Python ``int``, checked to be an integer ``>= minimum``.

    Raises:
        TypeError: ``value`` is not an integer (``bool`` included).
        ValueError: ``value < minimum``.

    Example:
        >>> import numpy as np
        >>> integer("dim", np.int64(3))
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def layer_sizes(name: str, value: object, allow_empty: bool = True) -> tuple[int, ...]:
    """A sequence of layer sizes (positive integers) as a tuple, e.g. ``hidden_dims``.

    Raises:
        TypeError: ``value`` is not a sequence (a bare ``64`` instead of ``(64,)``) or
            holds a non-integer.
        ValueError: a size below 1, or no size when ``allow_empty`` is false.

    Example:
        >>> layer_sizes("hidden_dims", [64, 64])
        (64, 64)
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a sequence of positive integers such as (64, 64), got {value!r}"
        )
    if not allow_empty and len(value) == 0:
        raise ValueError(f"{name} must hold at least one size, got {tuple(value)!r}")
    return tuple(integer(f"every entry of {name}", size) for size in value)


def positive_number(name: str, value: object) -> float:
    """``value`` as a ``float``, checked to be a finite number ``> 0``.

    Example:
        >>> positive_number("time", 1)
        1.0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not 0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_context(owner: str, context: object, context_dim: int) -> None:
    """Check a context against ``context_dim`` (0: no context allowed).

    Raises:
        ValueError: a context given to an unconditional module, none given to a
            conditional one, or a context whose last dimension is not ``context_dim``.
        TypeError: the context is not a tensor.
    """
    if context_dim == 0:
        if context is not None:
            raise ValueError(f"{owner} is unconditional (context_dim=0) but got a context")
        return
    if context is None:
        raise ValueError(
            f"{owner} is conditional (context_dim={context_dim}): it needs a context of "
            f"shape (..., {context_dim})"
        )
    if not isinstance(context, Tensor):
        raise TypeError(
            f"{owner}: expected the context to be a torch.Tensor, got {type(context).__name__}"
        )
    if context.dim() == 0 or context.shape[-1] != context_dim:
        raise ValueError(
            f"{owner}: expected a context with last dimension {context_dim}, "
            f"got shape {tuple(context.shape)}"
        )


def check_input_dtype(owner: str, value: Tensor, dtype: torch.dtype | None, name: str) -> None:
    """The input policy for dtypes: floating, and the module's own dtype when it has one.

    A flow computes in the dtype of its parameters; an input of another dtype is an
    error that names both, never a silent cast (which would hide a float64 pipeline
    running in float32, or integer data that was never dequantised).

    Raises:
        TypeError: ``value`` is not floating point, or its dtype differs from ``dtype``.
    """
    if not value.dtype.is_floating_point:
        raise TypeError(
            f"{owner}: expected the {name} to be a floating-point tensor"
            f"{'' if dtype is None else f' of dtype {dtype}'}, got dtype {value.dtype}"
        )
    if dtype is not None and value.dtype != dtype:
        raise TypeError(
            f"{owner}: the {name} has dtype {value.dtype} but the transform computes in "
            f"{dtype}; convert one of them (tensor.to({dtype}) or module.to({value.dtype}))"
        )


def concat_context(inputs: Tensor, context: Tensor | None) -> Tensor:
    """``inputs (..., D)`` and ``context (..., C)`` broadcast and joined into ``(..., D + C)``.

    Example:
        >>> concat_context(torch.zeros(5, 3), torch.ones(2)).shape
        torch.Size([5, 5])
    """
    if context is None:
        return inputs
    batch = torch.broadcast_shapes(inputs.shape[:-1], context.shape[:-1])
    return torch.cat(
        [inputs.expand(batch + inputs.shape[-1:]), context.expand(batch + context.shape[-1:])],
        dim=-1,
    )


def is_real_support(support: object) -> bool:
    """Whether ``support`` is the reals, possibly reinterpreted as events (``real_vector``).

    Such a support holds exactly the finite values, so a finiteness check covers it.

    Example:
        >>> from torch.distributions import constraints
        >>> is_real_support(constraints.real_vector), is_real_support(constraints.positive)
        (True, False)
    """
    from torch.distributions import constraints

    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real
