"""Diagnostics of a trained guide: Pareto-smoothed importance sampling and ArviZ export.

Draws ``z_s ~ q`` from the guide and scores them under the model, giving the log
importance weights

.. math:: \\log w_s = \\log p(x, z_s) - \\log q(z_s), \\qquad s = 1, \\dots, S.

Their mean is the ELBO; ``log mean exp`` is an importance-sampling estimate of
``log p(x)``; the shape ``k`` of a generalized Pareto distribution fitted to their
upper tail (PSIS) says whether the weights, hence the guide, can be trusted
(``k < 0.5`` good, ``0.5 <= k < 0.7`` usable, ``k >= 0.7`` unreliable).

Every ArviZ call of the package is in the small section at the end of this module
(``psislw``, ``from_dict``), so a change of ArviZ's API is a change in one place.
ArviZ (with xarray and matplotlib, about half of the package's import time) is
imported there on first use, so ``import pyro_nf`` does not load it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from torch import Tensor

from pyro_nf._validation import integer

if TYPE_CHECKING:
    import arviz as az

__all__ = ["PSISResult", "psis_diagnostic", "importance_draws", "to_inference_data"]

#: Above this k-hat, PSIS estimates (and the guide) are unreliable.
KHAT_THRESHOLD = 0.7


@dataclass
class PSISResult:
    """The result of :func:`psis_diagnostic`.

    Attributes:
        khat: the Pareto shape estimate of the weights' tail (``-inf`` when all the
            weights are equal: the guide is the posterior).
        ess: effective sample size of the PSIS-smoothed weights,
            :math:`1 / \\sum_s \\bar w_s^2` with normalized weights :math:`\\bar w`.
        num_samples: S, the number of guide draws.
        elbo: the mean of the raw log weights.
        log_evidence: :math:`\\log \\frac1S \\sum_s w_s`, the importance-sampling estimate
            of :math:`\\log p(x)` (a lower bound in expectation).
        log_weights: the raw log weights, shape ``(S,)``.
        smoothed_log_weights: PSIS-smoothed, normalized log weights, shape ``(S,)``.
        samples: the guide draws per latent site in the constrained space, shape
            ``(S, *site_shape)``.
    """

    khat: float
    ess: float
    num_samples: int
    elbo: float
    log_evidence: float
    log_weights: Tensor
    smoothed_log_weights: Tensor
    samples: dict[str, Tensor]

    @property
    def reliable(self) -> bool:
        """Whether ``khat < 0.7``: the weights' tail is light enough for PSIS."""
        return self.khat < KHAT_THRESHOLD

    def expectation(self, fn: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
        """The PSIS estimate of :math:`E_p[f(z)] = \\sum_s \\bar w_s f(z_s)`.

        ``fn`` maps the dict of draws (leading dimension S) to a tensor of shape
        ``(S, ...)``; the result has shape ``(...)``.
        """
        values = fn(self.samples)
        if values.shape[:1] != (self.num_samples,):
            raise ValueError(
                f"fn must return a tensor with leading dimension {self.num_samples}, got "
                f"shape {tuple(values.shape)}"
            )
        weights = self.smoothed_log_weights.exp().to(values.dtype)
        return torch.tensordot(weights, values, dims=1)

    def mean(self) -> dict[str, Tensor]:
        """PSIS-weighted posterior means of every site."""
        return {name: self.expectation(lambda s, n=name: s[n]) for name in self.samples}

    def variance(self) -> dict[str, Tensor]:
        """PSIS-weighted posterior variances of every site."""
        means = self.mean()
        return {
            name: self.expectation(lambda s, n=name: (s[n] - means[n]) ** 2)
            for name in self.samples
        }

    def to_inference_data(self) -> az.InferenceData:
        """These draws as ``arviz.InferenceData`` (see :func:`to_inference_data`)."""
        return _inference_data(self.samples, self.log_weights)


def _guess_max_plate_nesting(
    model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict
) -> int:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    dims = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def _site_draws(site: dict, num_samples: int, max_plate_nesting: int) -> Tensor:
    """A site's value with the particle dimension first and unused plate dims dropped."""
    value = site["value"]
    event_dim = site["fn"].event_dim
    batch = value.shape[: value.dim() - event_dim]
    plate_dims = {frame.dim for frame in site["cond_indep_stack"] if frame.vectorized}
    # Batch dims -max_plate_nesting..-1 belong to the model's plates; the particle
    # plate is the one just left of them.
    batch = (1,) * max(0, max_plate_nesting + 1 - len(batch)) + tuple(batch)
    kept = [
        size
        for position, size in enumerate(batch[-max_plate_nesting:] if max_plate_nesting else ())
        if position - max_plate_nesting in plate_dims or size != 1
    ]
    event_shape = value.shape[value.dim() - event_dim :]
    return value.reshape(num_samples, *kept, *event_shape)


@torch.no_grad()
def importance_draws(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Guide draws, vectorized over particles, and their log importance weights.

    Arguments:
        model: the Pyro model (vectorizable: static structure).
        guide: the guide.
        *args: the model's positional arguments.
        **kwargs: the model's keyword arguments.
        num_samples: S.
        batch_size: draws per vectorized pass (default: all S at once).
        max_plate_nesting: the model's plate nesting (guessed from one trace if None).

    Returns:
        ``log_weights`` of shape ``(S,)`` and a dict of draws per latent site in the
        constrained space, shape ``(S, *site_shape)``.
    """
    num_samples = integer("num_samples", num_samples, minimum=2)
    batch_size = num_samples if batch_size is None else integer("batch_size", batch_size)
    if max_plate_nesting is None:
        max_plate_nesting = _guess_max_plate_nesting(model, guide, args, kwargs)
    log_weights: list[Tensor] = []
    draws: dict[str, list[Tensor]] = {}
    remaining = num_samples
    while remaining > 0:
        size = min(batch_size, remaining)
        remaining -= size
        weights, model_trace, _ = vectorized_importance_weights(
            model,
            guide,
            *args,
            num_samples=size,
            max_plate_nesting=max_plate_nesting,
            **kwargs,
        )
        log_weights.append(weights.reshape(size))
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"]:
                draws.setdefault(name, []).append(_site_draws(site, size, max_plate_nesting))
    return torch.cat(log_weights), {name: torch.cat(parts) for name, parts in draws.items()}


def psis_diagnostic(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> PSISResult:
    r"""Pareto-smoothed importance sampling diagnostic of a guide.

    .. math::
        \log w_s = \log p(x, z_s) - \log q(z_s), \quad z_s \sim q, \qquad
        \hat k = \text{Pareto shape of the largest } w_s, \qquad
        \text{ESS} = 1 \big/ \textstyle\sum_s \bar w_s^2

    with :math:`\bar w` the PSIS-smoothed weights normalized to sum to one. Unlike
    ``pyro.infer.importance.psis_diagnostic``, which returns k-hat alone, the result
    keeps the weights and draws, so PSIS-corrected posterior expectations
    (:meth:`PSISResult.expectation`) and an ArviZ export come with it.

    Arguments:
        model: the Pyro model (static structure: the draws are vectorized over a
            particle plate).
        guide: a trained guide.
        *args: the model's positional arguments.
        **kwargs: the model's keyword arguments (the keyword names below are taken).
        num_samples: S, the number of guide draws (a few thousand for a stable k-hat).
        batch_size: draws per vectorized pass, to bound memory.
        max_plate_nesting: the model's plate nesting (guessed if None).

    Returns:
        a :class:`PSISResult`.

    References:
        Yes, but Did It Work?: Evaluating Variational Inference (Yao et al., 2018),
        arXiv:1802.02538. Pareto Smoothed Importance Sampling (Vehtari et al.,
        2015/2024), arXiv:1507.02646.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.2))
        >>> result = psis_diagnostic(model, guide, num_samples=2000)
        >>> result.reliable, result.samples["z"].shape
        (True, torch.Size([2000]))
    """
    log_weights, samples = importance_draws(
        model,
        guide,
        *args,
        num_samples=num_samples,
        batch_size=batch_size,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    )
    values = log_weights.detach().cpu().double().numpy()
    if not np.isfinite(values).all():
        raise ValueError(
            f"{int((~np.isfinite(values)).sum())} of {num_samples} log weights are not "
            "finite: the guide puts mass where the model has none (or the model is NaN)"
        )
    if np.ptp(values) == 0:
        smoothed, khat = np.full_like(values, -math.log(num_samples)), -math.inf
    else:
        smoothed, khat = _pareto_smoothed_log_weights(values)
    smoothed_tensor = torch.as_tensor(smoothed, dtype=log_weights.dtype, device=log_weights.device)
    return PSISResult(
        khat=khat,
        ess=float(1.0 / np.exp(2.0 * smoothed).sum()),
        num_samples=num_samples,
        elbo=float(values.mean()),
        log_evidence=float(np.logaddexp.reduce(values) - math.log(num_samples)),
        log_weights=log_weights,
        smoothed_log_weights=smoothed_tensor,
        samples=samples,
    )


def to_inference_data(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs: Any,
) -> az.InferenceData:
    """Guide draws as ``arviz.InferenceData``, with their log importance weights.

    The ``posterior`` group holds one chain of ``num_samples`` draws per latent site in
    the constrained space (dims ``chain, draw, *site_shape``), so ``az.summary`` and
    ``az.plot_pair`` work on it; the draws are the guide's, not reweighted. The
    ``sample_stats`` group holds ``log_weight``, :math:`\\log p(x, z) - \\log q(z)` of
    each draw, for reweighting (see :func:`psis_diagnostic`).

    Arguments:
        model: the Pyro model.
        guide: a trained guide.
        *args: the model's positional arguments.
        **kwargs: the model's keyword arguments.
        num_samples: the number of draws.
        batch_size: draws per vectorized pass.
        max_plate_nesting: the model's plate nesting (guessed if None).

    Returns:
        an ``arviz.InferenceData`` with ``posterior`` and ``sample_stats`` groups.

    Example:
        >>> import pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> def guide():
        ...     pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        >>> idata = to_inference_data(model, guide, num_samples=100)
        >>> idata.posterior["z"].shape, idata.sample_stats["log_weight"].shape
        ((1, 100, 2), (1, 100))
    """
    log_weights, samples = importance_draws(
        model,
        guide,
        *args,
        num_samples=num_samples,
        batch_size=batch_size,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    )
    return _inference_data(samples, log_weights)


# ------------------------------------------------------------------------------------
# The ArviZ calls (ArviZ 0.x API; ArviZ 1.x moves these functions), each importing ArviZ
# when it is first needed.


def _pareto_smoothed_log_weights(log_weights: np.ndarray) -> tuple[np.ndarray, float]:
    """``arviz.psislw``: normalized smoothed log weights and k-hat of one sample set."""
    with warnings.catch_warnings():
        # The k-hat is returned (and PSISResult.reliable says what it means), so
        # ArviZ's own warning about a large k-hat would only repeat it.
        warnings.simplefilter("ignore", UserWarning)
        import arviz

        smoothed, khat = arviz.psislw(log_weights, reff=1.0)
    return np.asarray(smoothed), float(khat)


def _inference_data(samples: dict[str, Tensor], log_weights: Tensor) -> az.InferenceData:
    """``arviz.from_dict`` with one chain of draws and their log weights."""
    posterior = {name: value.detach().cpu().numpy()[None] for name, value in samples.items()}
    sample_stats = {"log_weight": log_weights.detach().cpu().numpy()[None]}
    import arviz

    return arviz.from_dict(posterior=posterior, sample_stats=sample_stats)
