r"""Mixtures of reparametrized distributions, drawn stratified.

:class:`StratifiedMixture` is the posterior of an ``AutoFlow(model, components=K)`` guide:

.. math::
    q(x) = \sum_{k=1}^K w_k\, q_k(x),

with equal weights :math:`w_k = 1/K` (:data:`EqualMixture`, the default) or weights
:math:`w = \operatorname{softmax}(a)` of learned logits ``a``. The component a draw comes
from is not sampled: the draws are *stratified*. Of the ``n`` draws of one call,
component ``k`` gives :math:`\lfloor n w_k \rfloor` or one more (the extra draws are
allotted at random so that component ``k``'s expected count is exactly :math:`n w_k`),
in shuffled positions, each reparametrized through its own component. So the average
over the draws is an unbiased estimate of the expectation under ``q``, and with equal
weights every component meets the loss at every step (Morningstar et al., 2021,
"Automatic Differentiation Variational Inference with Mixtures", arXiv:2003.01687).

Since no draw's component carries a gradient, a plain ``Trace_ELBO`` cannot train the
weights; :class:`~pyro_nf.infer.MixtureELBO` does, on the *stratified* ELBO
:math:`\sum_k w_k\, \mathbb E_{q_k}[\log p(x) - \log q(x)]`, for which it has each
component draw the same number of draws in contiguous blocks (``blocks=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

__all__ = ["EqualMixture", "StratifiedMixture"]


class StratifiedMixture(dist.TorchDistribution):
    r"""The mixture :math:`q(x) = \sum_k w_k q_k(x)` of ``K`` reparametrized distributions
    over the same event shape, with equal weights (``logits=None``) or
    :math:`w = \operatorname{softmax}(\text{logits})`, drawn stratified.

    ``rsample`` is stratified (module docstring): of the ``n`` draws of a call, component
    ``k`` gives :math:`\lfloor n w_k \rfloor` or one more, in random positions, each
    reparametrized through its component; with ``blocks=True`` every component gives
    ``n / K`` draws in one contiguous block, component 0 first (the layout
    :class:`~pyro_nf.infer.MixtureELBO` weights). ``log_prob(x)`` is
    :math:`\operatorname{logsumexp}_k (\log w_k + \log q_k(x))`, so it scores every
    draw under every component: for a flow component that is its inverse (x -> u), the
    draw's own component included, since the draws are reordered after their
    components' passes.

    Shapes: each component has ``batch_shape == ()`` and the same ``event_shape`` ``E``;
    ``logits`` has shape ``(K,)``; the mixture's ``batch_shape`` is ``()`` until Pyro's
    plates expand it. ``rsample(sample_shape)`` returns ``sample_shape + batch_shape +
    E`` and ``log_prob(x)`` returns ``x.shape[:-len(E)]`` broadcast with ``batch_shape``.

    Arguments:
        components: the ``K >= 1`` distributions, each with ``has_rsample``.
        logits: the unnormalized log weights, shape ``(K,)``; ``None`` for equal weights.
            Gradients reach them through ``log_prob`` only (the draws' counts are not
            differentiable).
        blocks: draw ``n / K`` from each component in order, unshuffled (``n`` must be
            a multiple of ``K``).

    Raises:
        ValueError: for no components, a component with a batch shape, event shapes
            that differ, a component that cannot be reparametrized, or logits of
            another shape than ``(K,)``.

    Example:
        >>> q = StratifiedMixture(
        ...     [dist.Normal(torch.full((2,), -10.0), 1.0).to_event(1),
        ...      dist.Normal(torch.full((2,), 10.0), 1.0).to_event(1)],
        ...     logits=torch.tensor([1.0, 3.0]).log(),
        ... )
        >>> x = q.rsample((8,))
        >>> x.shape, int((x[:, 0] > 0).sum())  # a quarter of the draws from component 0
        (torch.Size([8, 2]), 6)
        >>> q.log_prob(x).shape
        torch.Size([8])
    """

    arg_constraints: dict[str, constraints.Constraint] = {}
    has_rsample = True

    def __init__(
        self,
        components: Sequence[dist.Distribution],
        logits: Tensor | None = None,
        batch_shape: torch.Size | Sequence[int] = (),
        validate_args: bool | None = None,
        *,
        blocks: bool = False,
    ) -> None:
        components = list(components)
        if not components:
            raise ValueError("a mixture needs at least one component")
        event_shape = components[0].event_shape
        for index, component in enumerate(components):
            if component.batch_shape != ():
                raise ValueError(
                    "the mixture's components must have batch_shape (), got "
                    f"{tuple(component.batch_shape)} for component {index}"
                )
            if component.event_shape != event_shape:
                raise ValueError(
                    f"the mixture's components must share one event shape, got "
                    f"{tuple(event_shape)} and {tuple(component.event_shape)} "
                    f"(component {index})"
                )
            if not component.has_rsample:
                raise ValueError(
                    f"the mixture's components must be reparametrized (has_rsample), "
                    f"component {index} ({type(component).__name__}) is not"
                )
        if logits is not None and logits.shape != (len(components),):
            raise ValueError(
                f"logits must have shape ({len(components)},), one per component, got "
                f"{tuple(logits.shape)}"
            )
        self.components = components
        self.logits = logits
        self.blocks = blocks
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
    ) -> StratifiedMixture:
        return StratifiedMixture(
            self.components, self.logits, batch_shape, validate_args=False, blocks=self.blocks
        )

    def component_counts(self, num_draws: int) -> Tensor:
        r"""How many of ``num_draws`` draws each component gives, shape ``(K,)``.

        With equal weights: ``num_draws // K`` each, plus one for ``num_draws % K``
        components chosen at random. With logits: :math:`\lfloor n w_k \rfloor`, plus
        one for components chosen by systematic sampling on the remainders
        :math:`r_k = n w_k - \lfloor n w_k \rfloor`, so component ``k`` gets the extra
        draw with probability :math:`r_k`. Either way component ``k``'s expected count
        is exactly :math:`n w_k` (Pyro's and torch's global random state). With
        ``blocks=True``: ``num_draws / K`` each.

        Raises:
            ValueError: with ``blocks=True``, for a ``num_draws`` that is not a multiple
                of ``K``.

        Example:
            >>> q = StratifiedMixture([dist.Normal(0.0, 1.0)] * 3)
            >>> q.component_counts(7).sort().values.tolist()
            [2, 2, 3]
        """
        num_components = self.num_components
        if self.blocks:
            if num_draws % num_components:
                raise ValueError(
                    f"a mixture drawn in blocks needs a number of draws that is a multiple "
                    f"of its {num_components} components, got {num_draws}"
                )
            return torch.full((num_components,), num_draws // num_components)
        if self.logits is None:
            counts = torch.full((num_components,), num_draws // num_components)
            extra = torch.randperm(num_components)[: num_draws % num_components]
            counts[extra] += 1
            return counts
        expected = num_draws * self.logits.detach().to("cpu", torch.float64).softmax(-1)
        counts = expected.floor()
        remainders = expected - counts
        num_extra = round(float(remainders.sum()))
        if num_extra:
            points = torch.rand((), dtype=torch.float64) + torch.arange(num_extra)
            chosen = torch.searchsorted(remainders.cumsum(-1), points, right=True)
            counts += torch.bincount(chosen.clamp(max=num_components - 1), minlength=num_components)
        return counts.long()

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """Stratified reparametrized draws, shape ``sample_shape + batch_shape + E``:
        component ``k`` gives ``component_counts(n)[k]`` of the ``n`` draws, each its
        own ``rsample`` (for a flow component the z -> x direction), in random
        positions (in blocks, component 0 first, with ``blocks=True``)."""
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
        if not self.blocks:
            draws = draws[torch.randperm(num_draws, device=draws.device)]
        return draws.reshape(shape + self.event_shape)

    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """:meth:`rsample` without a graph."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        """``log q(value) = logsumexp_k (log w_k + log q_k(value))``, each ``log q_k`` by
        the component's ``log_prob`` (for a flow component the x -> z direction), shape
        ``value.shape[:-len(E)]`` broadcast with ``batch_shape``."""
        scores = torch.stack([component.log_prob(value) for component in self.components], -1)
        if self.logits is None:
            log_q = torch.logsumexp(scores, -1) - math.log(self.num_components)
        else:
            log_q = torch.logsumexp(scores + self.logits.log_softmax(-1), -1)
        return log_q.expand(torch.broadcast_shapes(log_q.shape, self.batch_shape))


#: The equal-weight mixture :math:`q(x) = \frac1K \sum_k q_k(x)`: :class:`StratifiedMixture`
#: without logits (the name of the guides' mixture before weights could be learned).
EqualMixture = StratifiedMixture
