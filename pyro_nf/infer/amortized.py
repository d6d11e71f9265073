"""Amortized flow guides: a conditional flow per item of a plate, given by an encoder.

:class:`AmortizedFlowGuide` is the amortized guide of local latents under a plate: an
encoder maps the model's arguments to a context per item and a conditional flow gives
each item's posterior (the VAE pattern). :meth:`AmortizedFlowGuide.from_site` builds
the encoder and the flow from the site's shape and the data, with an amortized affine
layer after the flow (:class:`AmortizedAffine`); ``benchmarks/amortized.py`` measures
both against an amortized Normal and zuko's NSF (``docs/benchmarks/amortized.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import ConditionalTransformModule
from pyro.infer.autoguide import AutoGuide
from torch import Tensor, nn
from torch.distributions import AffineTransform, biject_to

from pyro_nf import flows  # noqa: F401 (the doctests' namespace)
from pyro_nf._validation import integer, is_real_support, positive_number
from pyro_nf.flows import Flow, flow_builder
from pyro_nf.infer.autoguide import _adopt_stored_parameters, _param_name
from pyro_nf.nn import MLP

__all__ = ["AmortizedAffine", "AmortizedFlowGuide", "FeatureEncoder", "first_argument_rows"]

#: The largest feature size ``F`` for which :meth:`AmortizedFlowGuide.from_site` puts the
#: raw features into the flow's context by default (``raw_features=None``): the largest
#: size at which the benefit was measured (F = 10 on Pyro's flow-guide tutorial, 16 on
#: the conjugate groups; ``docs/benchmarks/amortized.md``). Each of the flow's
#: conditioners takes ``F`` more inputs, ``F`` times its first hidden width in
#: parameters per layer; above the bound only the encoder's summary is the context
#: (``raw_features=True`` asks for the raw features at any size).
RAW_FEATURES_MAX_DIM = 16


def first_argument_rows(*args: Any, **kwargs: Any) -> Tensor:
    """The default features of :meth:`AmortizedFlowGuide.from_site`: one row per item.

    The model's first positional argument with every dimension after the first (the
    plate's) flattened: ``x`` of shape ``(items, ...)`` gives ``(items, F)``.

    Example:
        >>> first_argument_rows(torch.zeros(64, 5, 2)).shape
        torch.Size([64, 10])
    """
    if not args or not isinstance(args[0], Tensor) or args[0].dim() < 1:
        raise ValueError(
            "the default features read the model's first positional argument, a tensor "
            "with one row per item of the plate; pass features= for other signatures"
        )
    data = args[0]
    return data.reshape(data.shape[0], -1) if data.dim() > 1 else data[:, None]


class FeatureEncoder(nn.Module):
    r"""An encoder ``MLP(features(*args, **kwargs))``: the model's arguments to contexts.

    With ``raw_features=True`` the context is the features themselves followed by the
    MLP's output, :math:`c = [f, \text{MLP}(f)]` of size ``F + context_dim``
    (:attr:`out_features`), so the flow's conditioners see each item's data directly
    (as zuko's flows do, whose context is the data) besides the learned summary.

    Arguments:
        features: a function of the model's arguments returning ``(items, F)``.
        in_features: F.
        context_dim: the MLP's output size.
        hidden_dims: the MLP's hidden sizes.
        activation: the MLP's activation.
        raw_features: put the features before the MLP's output in the context.

    Example:
        >>> encoder = FeatureEncoder(first_argument_rows, 10, context_dim=4)
        >>> encoder(torch.randn(64, 5, 2)).shape
        torch.Size([64, 4])
    """

    def __init__(
        self,
        features: Callable[..., Tensor],
        in_features: int,
        context_dim: int,
        hidden_dims: Sequence[int] = (64, 64),
        activation: str = "relu",
        raw_features: bool = False,
    ) -> None:
        super().__init__()
        self.features = features
        self.raw_features = bool(raw_features)
        # Full-scale last layer: the contexts must differ between items from the start.
        self.network = MLP(in_features, context_dim, hidden_dims, 0, activation, 1.0)
        self.out_features = context_dim + (in_features if self.raw_features else 0)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        rows = self.features(*args, **kwargs)
        if self.raw_features:
            return torch.cat([rows, self.network(rows)], dim=-1)
        return self.network(rows)


class AmortizedAffine(ConditionalTransformModule):
    r"""An elementwise affine map whose location and scale are linear in the context.

    .. math::
        x = \mu(c) + \sigma(c) \odot z, \qquad
        [\mu(c), \tilde\sigma(c)] = W c + b, \quad \sigma = \operatorname{softplus}(\tilde\sigma)

    Direction: z -> x is the affine map (both directions are one pass), and
    ``log|det dx/dz| = sum log sigma(c)``. ``W`` starts at zero and ``b`` at
    ``mu = 0, sigma = init_scale``, so the layer starts as the same affine map for every
    item. Shapes: the context ``(..., context_dim)``, z and x ``(..., dim)``.

    Example:
        >>> layer = AmortizedAffine(3, context_dim=4)
        >>> layer.condition(torch.randn(5, 4))(torch.zeros(5, 3)).shape
        torch.Size([5, 3])
    """

    def __init__(self, dim: int, context_dim: int, init_scale: float = 1.0) -> None:
        super().__init__()
        self.dim = integer("dim", dim)
        init_scale = positive_number("init_scale", init_scale)
        self.linear = nn.Linear(integer("context_dim", context_dim), 2 * self.dim)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias[: self.dim].zero_()
            # softplus^{-1}(s) = log(exp(s) - 1)
            self.linear.bias[self.dim :].fill_(math.log(math.expm1(init_scale)))

    def condition(self, context: Tensor) -> AffineTransform:
        loc, raw_scale = self.linear(context).split(self.dim, dim=-1)
        return AffineTransform(loc, nn.functional.softplus(raw_scale), event_dim=1)


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

    :meth:`from_site` builds a default encoder and flow at the first call, from the
    site's event size and the data (the recommended start; see its measurements).

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
        self._build: Callable[[int, Tensor], tuple[nn.Module, Flow]] | None = None

    @classmethod
    def from_site(
        cls,
        model: Callable[..., Any],
        features: Callable[..., Tensor] = first_argument_rows,
        site: str = "z",
        flow: str = "iaf",
        context_dim: int = 16,
        encoder_hidden_dims: Sequence[int] = (64, 64),
        init_scale: float = 1.0,
        affine: bool = True,
        raw_features: bool | None = None,
        **flow_kwargs: Any,
    ) -> AmortizedFlowGuide:
        r"""The guide with a default encoder and flow, built from the site at the first call.

        .. math::
            x_i = \text{features}(\text{args})_i, \quad
            c_i = [x_i, \text{MLP}(x_i)], \qquad
            z_i = \mu(c_i) + \sigma(c_i) \odot f(u_i; c_i), \quad u_i \sim \mathcal N(0, I_D)

        At the first call the site's event size ``D`` is read from the model and the
        feature size ``F`` from ``features(*args, **kwargs)`` (shape ``(items, F)``);
        then the encoder is a :class:`FeatureEncoder` (an MLP ``F -> context_dim``,
        whose output follows the features themselves in the context unless
        ``raw_features`` is off: size ``C = F + context_dim``) and the flow is
        ``flow_builder(flow)(D, context_dim=C, **flow_kwargs)`` followed by an
        :class:`AmortizedAffine` layer (``mu, sigma``: the amortized counterpart of
        :class:`~pyro_nf.infer.AutoFlow`'s affine layer). Its parameters exist from
        the first call on (as for Pyro's autoguides).

        The raw features in the context (``raw_features``, on by default for ``F <=``
        :data:`RAW_FEATURES_MAX_DIM`): every conditioner of the flow and the affine
        layer get :math:`c_i = [x_i, \text{MLP}(x_i)]` instead of :math:`\text{MLP}(x_i)`
        alone: the conditioners see each item's data as zuko's flows do (their context
        is the data), besides the encoder's learned summary. The gain is the flow's: an
        amortized Normal whose linear head reads the same ``[x_i, MLP(x_i)]`` does not
        gain (tutorial ELBO 116.0 against 116.2, seed 0). Measured on
        ``benchmarks/amortized.py`` (1000 steps, the tutorial's recipe, seeds 0, 1, 2,
        each seed its own data; ``docs/benchmarks/amortized.md``), against the same
        guide without them and zuko's NSF of the tutorial:

        ======== ============================ ============================ ==================
        family   tutorial ELBO                tutorial mean log q(z*)      conjugate KL(q||p)
        ======== ============================ ============================ ==================
        iaf      151.8 / 137.8 / 164.9        1.69 / 0.78 / 2.32           0.017/0.011/0.010
        (before) 133.5 / 109.1 / 131.1        1.00 / -0.86 / 1.50          0.033/0.014/0.013
        realnvp  150.4 / 135.7 / 161.8        1.51 / 0.84 / 2.08           0.026/0.012/0.013
        (before) 121.1 / 94.4 / 120.3         0.57 / -1.20 / 1.26          0.022/0.022/0.019
        maf      153.1 / 132.6 / 166.0        1.82 / 0.49 / 2.32           0.018/0.010/0.010
        (before) 128.6 / 108.0 / 136.7        0.68 / -1.24 / 1.67          0.032/0.014/0.012
        zuko NSF 148.6 / 127.5 / 157.7        1.45 / 0.84 / 1.89           0.015/0.031/0.088
        Normal   116.2 / 98.6 / 120.0         -0.52 / -1.61 / 0.70         0.017/0.014/0.012
        ======== ============================ ============================ ==================

        The affine layer, with the raw features (``"iaf"``, seeds 0, 1, 2): without it
        the tutorial's ELBO is 138.6 / 111.4 / 160.8 and the conjugate KL(q || p)
        0.016 / 0.025 / 0.019 (against the table's first row). Before the raw features
        (one seed, 1000 steps) it helped ``"realnvp"`` on both tasks (tutorial ELBO
        +16.5, conjugate KL(q || p) 0.033 -> 0.021), was mixed for ``"maf"`` (+6.2;
        0.024 -> 0.032) and cost ``"iaf"`` a little (-12.0; 0.028 -> 0.032).
        ``affine=False`` leaves it out.

        Arguments:
            model: the Pyro model.
            features: the model's arguments to one row per item, ``(items, F)``;
                default :func:`first_argument_rows` (the first argument, flattened
                after its first dimension).
            site: the latent site (event shape ``(D,)``).
            flow: the family, a key of :data:`pyro_nf.flows.FLOW_BUILDERS`.
            context_dim: the size of the encoder's output.
            encoder_hidden_dims: the encoder MLP's hidden sizes.
            init_scale: the affine layer's initial ``sigma``.
            affine: put the :class:`AmortizedAffine` layer after the flow.
            raw_features: the flow's context is ``[features, MLP(features)]``
                (:class:`FeatureEncoder`), of size ``F + context_dim``, instead of
                ``MLP(features)``; ``None`` (default): when ``F <=``
                :data:`RAW_FEATURES_MAX_DIM`.
            **flow_kwargs: further arguments of the flow's builder.

        Example:
            >>> def model(x):
            ...     with pyro.plate("data", x.shape[0]):
            ...         z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            ...         pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)
            >>> guide = AmortizedFlowGuide.from_site(model, num_layers=2, hidden_dims=(8,))
            >>> guide(torch.randn(5, 2))["z"].shape
            torch.Size([5, 2])
        """
        builder = flow_builder(flow)
        context_dim = integer("context_dim", context_dim)
        init_scale = positive_number("init_scale", init_scale)
        if not callable(features):
            raise TypeError(f"features must be callable, got {type(features).__name__}")

        def build(dim: int, rows: Tensor) -> tuple[nn.Module, Flow]:
            if rows.dim() != 2:
                raise ValueError(
                    f"features must return one row per item, shape (items, F); got "
                    f"{tuple(rows.shape)}"
                )
            raw = rows.shape[-1] <= RAW_FEATURES_MAX_DIM if raw_features is None else raw_features
            encoder = FeatureEncoder(
                features, rows.shape[-1], context_dim, encoder_hidden_dims, raw_features=raw
            )
            size = encoder.out_features
            layers = builder(dim, context_dim=size, **flow_kwargs).layers
            if affine:
                layers.append(AmortizedAffine(dim, size, init_scale))
            return encoder, Flow(layers, dim, size).to(rows)

        guide = cls.__new__(cls)
        AutoGuide.__init__(guide, model)
        guide.encoder = None
        guide.flow = None
        guide.site = site
        guide._build = lambda dim, *args, **kwargs: build(dim, features(*args, **kwargs))
        return guide

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        node = self.prototype_trace.nodes.get(self.site)
        if node is None or node["type"] != "sample" or node["is_observed"]:
            latents = [name for name, _ in self.prototype_trace.iter_stochastic_nodes()]
            raise ValueError(f"no latent site {self.site!r} in the model; its latents: {latents}")
        event_shape = tuple(node["fn"].event_shape)
        if self._build is not None and self.flow is None:
            if len(event_shape) != 1:
                raise ValueError(
                    f"from_site needs a site with event shape (D,), got {event_shape} for "
                    f"{self.site!r}; reshape the site (e.g. .to_event(1))"
                )
            with torch.no_grad():
                self.encoder, self.flow = self._build(event_shape[0], *args, **kwargs)
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
        if is_real_support(self._support):
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
