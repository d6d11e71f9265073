"""Posterior test problems with known normalizing constants.

Each :class:`Target` is a Pyro model with one latent site ``"x"`` in ``R^D`` whose
joint density is an *unnormalized* density ``p~(x)`` with a normalizer
``log Z = log \\int p~(x) dx`` known in closed form. The site has a standard normal
prior (so Pyro's init strategies and samplers have a reference point) and a
``pyro.factor`` adds ``log p~(x) - log N(x; 0, I)``.
So ``log Z - ELBO`` is exactly ``KL(q || p)``, the quantity a guide should make small.
The models take no arguments and are vectorized (the log-density broadcasts over
leading batch dimensions), so ``Trace_ELBO(vectorize_particles=True)`` and
vectorized importance sampling work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
from torch import Tensor

from pyro_nf._validation import integer

__all__ = ["Target", "banana", "funnel", "twisted_gaussian"]


@dataclass(frozen=True)
class Target:
    """A model with a single latent site ``"x"`` of shape ``(dim,)`` and its ``log Z``.

    Attributes:
        name: a readable name.
        model: the Pyro model (no arguments).
        log_density: the unnormalized log-density ``x (..., dim) -> (...)``.
        log_normalizer: ``log Z``.
        dim: the latent dimension.
    """

    name: str
    model: Callable[[], None]
    log_density: Callable[[Tensor], Tensor]
    log_normalizer: float
    dim: int


def _target_model(dim: int, log_density: Callable[[Tensor], Tensor]) -> Callable[[], None]:
    def model() -> None:
        prior = dist.Normal(0.0, 1.0).expand([dim]).to_event(1)
        x = pyro.sample("x", prior)
        pyro.factor("log_density", log_density(x) - prior.log_prob(x))

    return model


def twisted_gaussian(scale: float = 1.0, twist: float = 1.0) -> Target:
    r"""The twisted Gaussian of Haario et al. (a "banana") in two dimensions, as a target.

    An unnormalized posterior with a known normalizer, for judging guides (``x_2`` has
    unit conditional variance and the twist ``b`` is 1 by default). It is another
    density than the toy *data* set :func:`pyro_nf.datasets.banana` (twist 0.3,
    conditional standard deviation 0.5), which is a sample, not a target.

    .. math::
        \log \tilde p(x) = -\frac{x_1^2}{2 a^2}
            - \frac{\big(x_2 - b (x_1^2 - a^2)\big)^2}{2},
        \qquad \log Z = \log(2 \pi a)

    The map ``(x_1, x_2) -> (x_1, x_2 - b(x_1^2 - a^2))`` has unit Jacobian and sends
    the banana to ``N(0, diag(a^2, 1))``, hence ``Z``.

    Arguments:
        scale: ``a``, the standard deviation of ``x_1``.
        twist: ``b``, the curvature (0 gives a Gaussian).

    References:
        An adaptive Metropolis algorithm (Haario, Saksman and Tamminen, 2001).

    Example:
        >>> target = twisted_gaussian()
        >>> round(target.log_normalizer, 4)
        1.8379
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")

    def log_density(x: Tensor) -> Tensor:
        x1, x2 = x[..., 0], x[..., 1]
        return -0.5 * (x1 / scale) ** 2 - 0.5 * (x2 - twist * (x1**2 - scale**2)) ** 2

    return Target(
        name="twisted_gaussian",
        model=_target_model(2, log_density),
        log_density=log_density,
        log_normalizer=math.log(2 * math.pi * scale),
        dim=2,
    )


#: The earlier name of :func:`twisted_gaussian` (the same function), kept as an alias.
banana = twisted_gaussian


def funnel(dim: int = 10, scale: float = 3.0) -> Target:
    r"""Neal's funnel in ``dim`` dimensions.

    .. math::
        \log \tilde p(v, x_{1:n}) = -\frac{v^2}{2 s^2} - \frac{n v}{2}
            - \frac{e^{-v}}{2} \sum_{i=1}^{n} x_i^2,
        \qquad \log Z = \tfrac12 \log(2 \pi s^2) + \tfrac n2 \log(2 \pi),

    i.e. ``v ~ N(0, s^2)`` and ``x_i | v ~ N(0, e^v)`` with ``n = dim - 1``; the latent
    vector is ``(v, x_1, ..., x_n)``.

    References:
        Slice sampling (Neal, 2003), arXiv:physics/0009028.

    Example:
        >>> target = funnel(dim=10)
        >>> round(target.log_normalizer, 4)
        10.288
    """
    dim = integer("dim", dim, minimum=2)
    n = dim - 1

    def log_density(x: Tensor) -> Tensor:
        v, rest = x[..., 0], x[..., 1:]
        return -0.5 * (v / scale) ** 2 - 0.5 * n * v - 0.5 * rest.pow(2).sum(-1) * (-v).exp()

    return Target(
        name="funnel",
        model=_target_model(dim, log_density),
        log_density=log_density,
        log_normalizer=0.5 * math.log(2 * math.pi * scale**2) + 0.5 * n * math.log(2 * math.pi),
        dim=dim,
    )
