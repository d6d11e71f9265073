r"""An equal-weight mixture of reparametrized distributions, drawn stratified.

:class:`EqualMixture` is the posterior of an ``AutoFlow(model, components=K)`` guide:

.. math::
    q(x) = \frac1K \sum_{k=1}^K q_k(x).

With fixed, equal weights the component a draw comes from carries no parameter, so a
draw is reparametrized through its own component and the ELBO's gradient needs no score
term for the choice. The draws are *stratified*: of the ``n`` draws of one call, each
component gives ``n // K`` or ``n // K + 1`` (the extra draws go to a random choice of
components), in shuffled positions, so every component meets the loss at every step and
the average over the draws is an unbiased estimate of the expectation under ``q``
(Morningstar et al., 2021, "Automatic Differentiation Variational Inference with
Mixtures", arXiv:2003.01687).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = ["EqualMixture"]


class EqualMixture(dist.TorchDistribution):
    r"""The equal-weight mixture :math:`q(x) = \frac1K \sum_k q_k(x)` of ``K``
    reparametrized distributions over the same event shape.

    ``rsample`` is stratified (module docstring): of the ``n`` draws of a call, component
    ``k`` gives ``n // K`` or one more, in random positions, each reparametrized through
    its component. ``log_prob(x)`` is :math:`\operatorname{logsumexp}_k \log q_k(x) -
    \log K`, so it scores every draw under every component: for a flow component that
    is its inverse (x -> u), the draw's own component included, since the draws are
    reordered after their components' passes.

    Shapes: each component has ``batch_shape == ()`` and the same ``event_shape`` ``E``;
    the mixture's ``batch_shape`` is ``()`` until Pyro's plates expand it.
    ``rsample(sample_shape)`` returns ``sample_shape + batch_shape + E`` and
    ``log_prob(x)`` returns ``x.shape[:-len(E)]`` broadcast with ``batch_shape``.

    Arguments:
        components: the ``K >= 1`` distributions, each with ``has_rsample``.

    Raises:
        ValueError: for no components, a component with a batch shape, event shapes
            that differ, or a component that cannot be reparametrized.

    Example:
        >>> q = EqualMixture(
        ...     [dist.Normal(torch.full((2,), -10.0), 1.0).to_event(1),
        ...      dist.Normal(torch.full((2,), 10.0), 1.0).to_event(1)]
        ... )
        >>> x = q.rsample((4,))
        >>> x.shape, int((x[:, 0] > 0).sum())  # two draws from each component
        (torch.Size([4, 2]), 2)
        >>> q.log_prob(x).shape
        torch.Size([4])
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = True

    def __init__(
        self,
        components: Sequence[dist.Distribution],
        batch_shape: torch.Size | Sequence[int] = (),
        validate_args: bool | None = None,
    ) -> None:
        components = list(components)
        if not components:
            raise ValueError("EqualMixture needs at least one component")
        event_shape = components[0].event_shape
        for index, component in enumerate(components):
            if component.batch_shape != ():
                raise ValueError(
                    "EqualMixture's components must have batch_shape (), got "
                    f"{tuple(component.batch_shape)} for component {index}"
                )
            if component.event_shape != event_shape:
                raise ValueError(
                    f"EqualMixture's components must share one event shape, got "
                    f"{tuple(event_shape)} and {tuple(component.event_shape)} "
                    f"(component {index})"
                )
            if not component.has_rsample:
                raise ValueError(
                    f"EqualMixture's components must be reparametrized (has_rsample), "
                    f"component {index} ({type(component).__name__}) is not"
                )
        self.components = components
        super().__init__(torch.Size(batch_shape), event_shape, validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        """The components' support (the first component's)."""
        return self.components[0].support

    @property
    def num_components(self) -> int:
        """``K``, the number of components."""
        return len(self.components)

    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: Any = None
    ) -> EqualMixture:
        return EqualMixture(self.components, batch_shape, validate_args=False)

    def component_counts(self, num_draws: int) -> Tensor:
        """How many of ``num_draws`` draws each component gives: ``num_draws // K`` each,
        plus one for ``num_draws % K`` components chosen at random (Pyro's and torch's
        global random state), so each component's expected share is exactly ``1 / K``.

        Example:
            >>> q = EqualMixture([dist.Normal(0.0, 1.0)] * 3)
            >>> q.component_counts(7).sort().values.tolist()
            [2, 2, 3]
        """
        counts = torch.full((self.num_components,), num_draws // self.num_components)
        extra = torch.randperm(self.num_components)[: num_draws % self.num_components]
        counts[extra] += 1
        return counts

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """Stratified reparametrized draws, shape ``sample_shape + batch_shape + E``:
        component ``k`` gives ``component_counts(n)[k]`` of the ``n`` draws, each its
        own ``rsample`` (for a flow component the z -> x direction), in random
        positions."""
        shape = torch.Size(sample_shape) + self.batch_shape
        num_draws = shape.numel()
        if num_draws == 0:
            return self.components[0].rsample(shape)
        counts = self.component_counts(num_draws).tolist()
        draws = torch.cat(
            [
                component.rsample((count,))
                for component, count in zip(self.components, counts, strict=True)
                if count
            ]
        )
        order = torch.randperm(num_draws, device=draws.device)
        return draws[order].reshape(shape + self.event_shape)

    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """:meth:`rsample` without a graph."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log q(value) = logsumexp_k log q_k(value) - log K``, each ``log q_k`` by
        the component's ``log_prob`` (for a flow component the x -> z direction), shape
        ``value.shape[:-len(E)]`` broadcast with ``batch_shape``."""
        scores = torch.stack([component.log_prob(value) for component in self.components], -1)
        log_q = torch.logsumexp(scores, -1) - math.log(self.num_components)
        return log_q.expand(torch.broadcast_shapes(log_q.shape, self.batch_shape))
