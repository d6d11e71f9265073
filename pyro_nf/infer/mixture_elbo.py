r"""The stratified ELBO of a mixture guide, which trains its weights: :class:`MixtureELBO`.

For a guide :math:`q(\theta) = \sum_k w_k q_k(\theta)` the ELBO splits by component,

.. math::
    \mathcal L = \sum_{k=1}^K w_k\, \mathbb E_{q_k(\theta)}
        \big[\log p(\theta, y) - \log q(\theta)\big],

and each expectation is under its own component, so it is estimated with draws
reparametrized through that component alone, and the weights enter only as the factors
:math:`w_k` and inside :math:`\log q`. The gradient of the estimate with respect to
the weights is then unbiased without a score-function term for the component choice
(Morningstar et al., 2021, "Automatic Differentiation Variational Inference with
Mixtures", arXiv:2003.01687, section 3). A plain ``Trace_ELBO`` averages draws that
*follow* the weights, so the weights reach its estimate only through :math:`\log q`,
whose expected gradient is zero: it cannot train them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist  # noqa: F401 (the doctests' namespace)
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_identically_zero, is_validation_enabled
from pyro.util import check_if_enumerated, warn_if_nan
from torch import Tensor

from pyro_nf.infer.autoguide import AutoFlow

__all__ = ["MixtureELBO", "elbo_for_guide"]


class MixtureELBO(Trace_ELBO):
    r"""The stratified ELBO of an :class:`~pyro_nf.infer.AutoFlow` guide of ``K`` flows
    (module docstring), which trains learned weights (``mixture_weights="learned"``).

    .. math::
        \hat{\mathcal L} = \sum_{k=1}^K w_k\, \frac1m \sum_{i=1}^{m}
            \big[\log p(\theta_{k,i}, y) - \log q(\theta_{k,i})\big],
        \qquad \theta_{k,i} \sim q_k

    Each step draws ``m = ceil(num_particles / K)`` points from every component (``K m``
    in all, vectorized over one plate as ``Trace_ELBO(vectorize_particles=True)``
    does), runs the model on them and weights each component's mean by ``w_k``.
    Direction: a draw is its component's map of a base draw (z -> x, reparametrized);
    :math:`\log q` scores it under every component by their inverses (x -> z). Shapes:
    the guide's latent has event shape ``(D,)`` and batch shape ``(K m,)`` (then the
    model's plate dims), component ``k``'s draws the rows ``k m`` to ``(k + 1) m - 1``;
    the loss is a scalar. For a
    one-flow guide (``K = 1``) it is the ELBO of ``Trace_ELBO``. With equal weights its
    expectation is ``Trace_ELBO``'s, whose stratified draws estimate the same sum. The
    guide's ``gradient`` option applies: with ``"path"`` the score ``log q`` is detached
    from every guide parameter, the weights included, and the weights learn from the
    factors ``w_k`` alone.

    Use it wherever an ELBO goes: ``SVI(model, guide, optim, MixtureELBO())``,
    ``differentiable_loss`` in a loop of your own, or ``loss`` to evaluate.
    :func:`~pyro_nf.infer.fit_guide` uses it for a guide with learned weights.

    Arguments:
        num_particles: the draws per step over all components (rounded up to a
            multiple of ``K``), a positive integer.
        max_plate_nesting: the model's plate depth (guessed from one run of the model
            and guide when ``inf``, as Pyro's ELBOs do).

    Raises:
        ValueError: for a ``num_particles`` that is not a positive integer.
        TypeError: (at a loss) for a guide that is not an ``AutoFlow``.
        NotImplementedError: (at a loss) for a guide site that is not reparametrized.

    Example:
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlow(model, flow="realnvp", components=2, mixture_weights="learned",
        ...                  num_layers=2, hidden_dims=(8,))
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), MixtureELBO())
        >>> loss = svi.step()
        >>> guide.get_mixture_weights().shape
        torch.Size([2])
    """

    def __init__(self, num_particles: int = 8, max_plate_nesting: float = math.inf) -> None:
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, int)
            or num_particles < 1
        ):
            raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
        # Not Pyro's vectorization: the particle plate's size depends on the guide's K,
        # so this class adds the plate itself, one dim left of the model's plates.
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
        )

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Tensor:
        """The negative stratified ELBO estimate, differentiable in the model's and the
        guide's parameters (the weights included), shape ``()``."""
        if not isinstance(guide, AutoFlow):
            raise TypeError(
                "MixtureELBO trains an AutoFlow guide (one flow or a mixture of flows), "
                f"got {type(guide).__name__}; use Trace_ELBO for other guides"
            )
        if self.max_plate_nesting == math.inf:
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        num_components = guide.num_components
        per_component = -(-self.num_particles // num_components)
        num_draws = num_components * per_component
        particle_dim = self.max_plate_nesting + 1  # from the right, in batch dims
        particles = pyro.plate("num_particles_vectorized", num_draws, dim=-particle_dim)
        with guide._draws_in_blocks():
            model_trace, guide_trace = get_importance_trace(
                "flat", particle_dim, particles(model), particles(guide), args, kwargs
            )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        elbo_per_draw: Tensor | int = 0
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample":
                elbo_per_draw = elbo_per_draw + _per_draw(name, site["log_prob"], particle_dim)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                _, score_function_term, entropy_term = site["score_parts"]
                if not is_identically_zero(score_function_term):
                    raise NotImplementedError(
                        f"MixtureELBO needs reparametrized guide sites, but site {name!r} is not"
                    )
                elbo_per_draw = elbo_per_draw - _per_draw(name, entropy_term, particle_dim)
        component_means = (
            torch.as_tensor(elbo_per_draw).expand(num_draws).reshape(num_components, -1).mean(-1)
        )
        loss = -(guide.get_mixture_weights() * component_means).sum()
        warn_if_nan(loss, "loss")
        return loss

    def loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float:
        """The negative stratified ELBO estimate, a float (no graph)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float:
        """The negative stratified ELBO estimate, a float, after backpropagating it into
        the parameters' ``.grad`` (what ``SVI.step`` calls)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())


def elbo_for_guide(
    guide: Callable[..., Any], num_particles: int, max_plate_nesting: float = math.inf
) -> ELBO:
    """The ELBO that trains ``guide`` with ``num_particles`` vectorized draws a step:
    :class:`MixtureELBO` for an :class:`~pyro_nf.infer.AutoFlow` whose mixture weights
    are learned (a plain ``Trace_ELBO`` gives them no gradient), else
    ``Trace_ELBO(vectorize_particles=True)``.

    Example:
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlow(model, flow="realnvp", components=2, mixture_weights="learned")
        >>> type(elbo_for_guide(guide, 8)).__name__
        'MixtureELBO'
        >>> type(elbo_for_guide(AutoFlow(model), 8)).__name__
        'Trace_ELBO'
    """
    if isinstance(guide, AutoFlow) and guide.mixture_weights == "learned":
        return MixtureELBO(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
    return Trace_ELBO(
        num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting
    )


def _per_draw(name: str, log_prob: Tensor | float, particle_dim: int) -> Tensor:
    """Site ``name``'s log-density summed over every dim but the particles'
    (``particle_dim`` from the right), shape ``(num_draws,)``, or ``(1,)`` for a site
    that does not vary over the draws.

    Raises:
        ValueError: for a log-density with dims left of the particles' (a site whose
            batch shape reaches past the model's plates).
    """
    log_prob = torch.as_tensor(log_prob)
    if log_prob.dim() < particle_dim:
        return log_prob.sum().reshape(1)
    if log_prob.dim() > particle_dim:
        raise ValueError(
            f"site {name!r} has log-density shape {tuple(log_prob.shape)}, with dims left "
            f"of the particles' plate (dim {-particle_dim}): its batch shape reaches past "
            "the model's plates, or max_plate_nesting is too small"
        )
    by_draw = log_prob.movedim(-particle_dim, 0)
    return by_draw.reshape(by_draw.shape[0], -1).sum(-1)
