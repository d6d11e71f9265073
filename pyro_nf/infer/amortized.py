"""Amortized flow guides: a conditional flow per item of a plate, given by an encoder.

:class:`AmortizedFlowGuide` is the amortized guide of local latents under a plate: an
encoder maps the model's arguments to a context per item and a conditional flow gives
each item's posterior (the VAE pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
from pyro.infer.autoguide import AutoGuide
from torch import Tensor, nn
from torch.distributions import biject_to

from pyro_nf import flows  # noqa: F401 (the doctests' namespace)
from pyro_nf.flows import Flow
from pyro_nf.infer.autoguide import _adopt_stored_parameters, _is_real, _param_name

__all__ = ["AmortizedFlowGuide"]


class AmortizedFlowGuide(AutoGuide):
    r"""An amortized flow guide for one local latent site under plates (the VAE encoder).

    .. math::
        c_i = \text{encoder}(\text{args})_i, \qquad q(z_i \mid x) = \text{flow}(c_i),

    i.e. each item's posterior is the conditional flow at the context the encoder
    computes for it. The encoder is called with the model's own ``*args, **kwargs`` and
    must return contexts of shape ``plate_shape + (flow.context_dim,)``. A site with a
    constrained support gets ``biject_to(support)`` after the flow.

    Direction: sampling is the flow's z -> x, and ``Trace_ELBO`` scores the guide's own
    draws from the cache (one pass of the cheap direction of an IAF or coupling flow).

    Other latent sites can be given another guide with ``AutoGuideList``, e.g.
    ``AutoNormal(poutine.block(model, hide=[site]))`` for the global ones. Data
    subsampling should happen outside the model (pass the minibatch as an argument),
    so that the encoder sees the same items as the plate.

    Arguments:
        model: the Pyro model.
        encoder: an ``nn.Module`` called as ``encoder(*args, **kwargs)``.
        flow: a conditional :class:`~pyro_nf.Flow` (``context_dim > 0``) whose ``dim``
            is the site's event size.
        site: the name of the latent site.

    Example:
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        ...         pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
        >>> flow = flows.realnvp(dim=2, context_dim=4, num_layers=2, hidden_dims=(8,))
        >>> guide = AmortizedFlowGuide(model, nn.Linear(2, 4), flow, site="z")
        >>> guide(torch.randn(5, 2))["z"].shape
        torch.Size([5, 2])
    """

    def __init__(
        self, model: Callable[..., Any], encoder: nn.Module, flow: Flow, site: str = "z"
    ) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        if not isinstance(flow, Flow) or flow.context_dim == 0:
            raise ValueError(
                f"flow must be a conditional pyro_nf.Flow (context_dim > 0), got {flow!r}"[:200]
            )
        super().__init__(model)
        self.encoder = encoder
        self.flow = flow
        self.site = site

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        node = self.prototype_trace.nodes.get(self.site)
        if node is None or node["type"] != "sample" or node["is_observed"]:
            latents = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
            raise ValueError(f"no latent site {self.site!r} in the model; its latents: {latents}")
        event_shape = tuple(node["fn"].event_shape)
        if event_shape != (self.flow.dim,):
            raise ValueError(
                f"site {self.site!r} has event shape {event_shape} but the flow has "
                f"dim={self.flow.dim}; expected event shape ({self.flow.dim},)"
            )
        self._support = node["fn"].support
        self._cond_indep_stack = node["cond_indep_stack"]
        for attribute in ("encoder", "flow"):
            _adopt_stored_parameters(_param_name(self, attribute), getattr(self, attribute))

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        """The distribution of the site given the model's arguments (batch: the plates)."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        context = self.encoder(*args, **kwargs)
        posterior = self.flow(context)
        if _is_real(self._support):
            return posterior
        return dist.TransformedDistribution(posterior, [biject_to(self._support).with_cache()])

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample the site (under the model's plates); returns ``{site: value}``."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        posterior = self.get_posterior(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        with ExitStack() as stack:
            for frame in self._cond_indep_stack:
                if frame.vectorized:
                    stack.enter_context(plates[frame.name])
            value = pyro.sample(self.site, posterior)
        return {self.site: value}
