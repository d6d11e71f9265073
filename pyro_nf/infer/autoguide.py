"""Flow autoguides: a normalizing-flow posterior over all latent sites of a Pyro model.

:class:`AutoFlow` is an ``AutoContinuous`` guide: it concatenates every latent site, in
its unconstrained space, into one vector of size D and gives it the posterior

.. math::
    u \\sim \\mathcal N(0, I_D), \\qquad y = f_K \\circ \\dots \\circ f_1(u), \\qquad
    \\theta_{\\text{unconstrained}} = \\mu + \\sigma \\odot y

with flow layers ``f_k`` that start near the identity and an affine layer whose
location ``mu`` starts at the model's init location and whose scale ``sigma`` starts at
``init_scale`` (1.0): the guide starts as a standard-width Gaussian at a sensible
point and the flow learns the shape.

The amortized guide of local latents, :class:`~pyro_nf.infer.amortized.AmortizedFlowGuide`,
lives in :mod:`pyro_nf.infer.amortized`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam
from pyro.params.param_store import param_with_module_name
from torch import Tensor, nn
from torch.distributions import Transform, biject_to
from torch.distributions.transforms import AffineTransform, ComposeTransform

from pyro_nf import flows  # noqa: F401 (the doctests' namespace)
from pyro_nf.flows import FLOW_BUILDERS, Flow, flow_builder

__all__ = ["AutoFlow", "FLOW_FAMILIES"]

#: The family names ``AutoFlow(model, flow=name)`` accepts: the keys of
#: :data:`pyro_nf.flows.FLOW_BUILDERS` (kept as a public alias of that registry).
FLOW_FAMILIES: tuple[str, ...] = tuple(FLOW_BUILDERS)

#: Latent dimensions above which a ``"cnf"`` guide estimates the divergence with
#: Hutchinson's estimator (an exact trace costs one backward pass per dimension).
CNF_EXACT_TRACE_MAX_DIM = 16


def guide_flow_defaults(family: str, dim: int) -> dict[str, Any]:
    """The builder arguments ``AutoFlow`` passes for ``family`` unless the user gives them.

    Chosen on the posterior suite (``benchmarks/posteriors.py``, table in
    ``docs/benchmarks/posteriors.md``); the builders' own defaults serve density models.
    ``"cnf"``: training tolerances ``rtol = atol = 1e-3`` and backpropagation through
    the solver (the builder's ``1e-5`` and adjoint cost about 13x per step on a
    100-dimensional latent), and Hutchinson's trace above
    :data:`CNF_EXACT_TRACE_MAX_DIM` dimensions.

    Example:
        >>> guide_flow_defaults("cnf", 100)["trace"]
        'hutchinson'
    """
    if family == "cnf":
        trace = "exact" if dim <= CNF_EXACT_TRACE_MAX_DIM else "hutchinson"
        return {"rtol": 1e-3, "atol": 1e-3, "adjoint": False, "trace": trace}
    return {}


class AutoFlow(AutoContinuous):
    r"""A normalizing-flow autoguide over all latent sites, starting at the init location.

    .. math::
        q(\theta) : \quad u \sim \mathcal N(0, I_D), \qquad
        \theta_{\text{unc}} = \mu + \sigma \odot f_K \circ \dots \circ f_1(u)

    ``D`` is the total size of all latent sites in their unconstrained spaces (each site
    is mapped to its support by ``biject_to``). ``mu`` is initialized by
    ``init_loc_fn`` (as in ``AutoMultivariateNormal``), ``sigma`` to ``init_scale``
    (kept positive by a softplus) and the flow layers start near the identity.

    Direction: sampling the guide is the flow's z -> x direction, and scoring its own
    draws (``rsample`` then ``log_prob``, which is what ``Trace_ELBO`` does) reads the
    transforms' caches, so one step costs one pass of z -> x. That is the cheap
    direction of ``"iaf"`` (the default) and of ``"realnvp"``; a ``"maf"`` guide pays
    its sequential direction to sample. Scoring *foreign* points (e.g. importance
    weights of other draws) runs x -> z, cheap for ``"maf"`` and ``"realnvp"``.

    ``get_transform()`` returns the whole map ``u -> theta_unc``, so the trained guide
    can be given to ``pyro.infer.reparam.NeuTraReparam``.

    Every parameter (``loc``, ``scale`` and each flow layer's) lives in Pyro's param
    store under the guide's name, so ``pyro.get_param_store().save(path)``, then
    ``pyro.clear_param_store()``, ``load(path)`` and a fresh ``AutoFlow`` with the same
    arguments restore the trained guide exactly, and further SVI steps keep training
    every layer. (Buffers such as masks and orders are not in the store; the builders
    make them deterministically.) A store left over from a guide of the same name for
    another model is a ``ValueError`` at the first call. :meth:`median` and
    :meth:`quantiles` are Monte Carlo estimates from ``num_quantile_samples`` draws.

    Arguments:
        model: a Pyro model with continuous latent sites.
        flow: ``"iaf"``, ``"maf"``, ``"realnvp"`` or ``"cnf"`` (a builder of
            :mod:`pyro_nf.flows`, called as ``builder(dim=D, **flow_kwargs)``), or a
            callable ``D -> transform`` returning a ``Transform`` (a
            ``TransformModule`` if it has parameters) or a :class:`~pyro_nf.Flow`.
        init_loc_fn: a per-site initialization of ``mu`` (Pyro's
            ``init_to_median`` by default).
        init_scale: the initial ``sigma``, a positive float. The default 1.0 was
            chosen on the posterior suite (``benchmarks/posteriors.py``): against
            Pyro's 0.1 it lowers KL(q || p) of the iaf and realnvp guides on the
            banana, the funnel and the bimodal target, and the moment errors on eight
            schools, because with a small ``sigma`` the flow layers must take over the
            scaling (``docs/benchmarks/posteriors.md``).
        **flow_kwargs: keyword arguments of the builder (e.g. ``num_layers``,
            ``hidden_dims``).

    Raises:
        ValueError: for an unknown flow name or a non-positive ``init_scale`` (at
            construction), for a flow that cannot be built at the latent dimension,
            e.g. ``"realnvp"`` for a single latent dimension (at the first call).

    References:
        Variational Inference with Normalizing Flows (Rezende and Mohamed, 2015),
        arXiv:1505.05770. Improved Variational Inference with Inverse Autoregressive
        Flow (Kingma et al., 2016), arXiv:1606.04934.

    Example:
        >>> def model():
        ...     pyro.sample("a", dist.Normal(0.0, 1.0))
        ...     pyro.sample("b", dist.LogNormal(0.0, 1.0))
        >>> guide = AutoFlow(model, flow="realnvp", num_layers=2, hidden_dims=(8,))
        >>> sorted(guide())
        ['a', 'b']
        >>> guide.latent_dim
        2
    """

    scale_constraint = constraints.softplus_positive
    #: The number of guide draws behind :meth:`median` and :meth:`quantiles`.
    num_quantile_samples: int = 10_000

    def __init__(
        self,
        model: Callable[..., Any],
        flow: str | Callable[[int], Transform | Flow] = "iaf",
        init_loc_fn: Callable[[dict], Tensor] = init_to_median,
        init_scale: float = 1.0,
        **flow_kwargs: Any,
    ) -> None:
        if isinstance(flow, str):
            try:
                inspect.signature(flow_builder(flow)).bind(dim=1, **flow_kwargs)
            except TypeError as error:
                raise TypeError(f"bad keyword arguments for flow {flow!r}: {error}") from None
        elif not callable(flow):
            raise TypeError(
                f"flow must be one of {FLOW_FAMILIES} or a callable, got {type(flow).__name__}"
            )
        elif flow_kwargs:
            raise ValueError(
                "flow keyword arguments are only used with a named flow; "
                f"got {sorted(flow_kwargs)} with a callable"
            )
        if not isinstance(init_scale, int | float) or not init_scale > 0:
            raise ValueError(f"init_scale must be a positive float, got {init_scale!r}")
        self._flow_spec = flow
        self._flow_kwargs = flow_kwargs
        self._init_scale = float(init_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _build_flow(self, dim: int) -> Transform | Flow:
        spec = self._flow_spec
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
        try:
            built = (
                flow_builder(spec)(
                    dim=dim, **{**guide_flow_defaults(spec, dim), **self._flow_kwargs}
                )
                if isinstance(spec, str)
                else spec(dim)
            )
        except ValueError as error:
            raise ValueError(
                f"AutoFlow could not build flow {name!r} for the model's {dim}-dimensional "
                f"latent: {error}"
            ) from error
        if isinstance(built, Flow):
            if built.context_dim > 0:
                raise ValueError(
                    "AutoFlow needs an unconditional flow, got one with "
                    f"context_dim={built.context_dim}; use AmortizedFlowGuide for a "
                    "conditional flow"
                )
            if built.dim != dim:
                raise ValueError(f"the flow has dim={built.dim} but the latent has dim={dim}")
        elif not isinstance(built, Transform):
            raise TypeError(
                f"the flow callable must return a Transform or a pyro_nf.Flow, got "
                f"{type(built).__name__}"
            )
        return built

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        init_loc = self._init_loc()
        built = self._build_flow(self.latent_dim)
        if isinstance(built, nn.Module):
            # Parameters and buffers follow the model's init locations (device, dtype).
            built = built.to(device=init_loc.device, dtype=init_loc.dtype)
        shape = init_loc.shape
        _check_stored_shapes({_param_name(self, "loc"): shape, _param_name(self, "scale"): shape})
        if isinstance(built, nn.Module):
            _adopt_stored_parameters(_param_name(self, "flow"), built)
        self.flow = built
        self.loc = nn.Parameter(init_loc)
        self.scale = PyroParam(torch.full_like(init_loc, self._init_scale), self.scale_constraint)

    def _flow_layers(self) -> list[Transform]:
        flow = self.flow
        if isinstance(flow, Flow):
            return flow.layers
        if isinstance(flow, ComposeTransform):
            return list(flow.parts)
        return [flow]

    def get_base_dist(self) -> dist.Distribution:
        """The standard normal base ``N(0, I_D)`` on the guide's device and dtype."""
        loc = self.loc
        return dist.Normal(torch.zeros_like(loc), torch.ones_like(loc)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> ComposeTransform:
        """The map from the base ``u`` to the unconstrained latent (flow, then affine)."""
        affine = AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)
        return ComposeTransform([*self._flow_layers(), affine])

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The posterior over the unconstrained latent vector, a ``TransformedDistribution``."""
        transform = self.get_transform(*args, **kwargs)
        return dist.TransformedDistribution(self.get_base_dist(), transform.parts)

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Tensor]:
        r"""Monte Carlo estimates of the posterior quantiles of every latent site.

        A flow has no closed-form quantiles, so the guide draws
        ``S = self.num_quantile_samples`` (10,000 by default) points of the
        unconstrained latent :math:`\theta_{\text{unc}}` and takes the empirical
        quantile of each coordinate, then maps it to the site's support with
        ``biject_to`` (Pyro's convention for ``AutoContinuous`` guides; for an
        elementwise monotone support map such as ``exp`` this is the quantile of the
        constrained coordinate). The standard error of a quantile estimate is
        :math:`\sqrt{q(1-q)/S} / p(\theta_q)`, about 0.0125 standard deviations for
        the median of a Gaussian marginal at ``S = 10,000``. Draws use Pyro's global
        random state (``pyro.set_rng_seed`` makes them reproducible) and change no
        parameter.

        Arguments:
            quantiles: levels in ``[0, 1]``, e.g. ``[0.05, 0.5, 0.95]``.
            *args, **kwargs: the model's arguments (used only to set the guide up).

        Returns:
            a dict from site name to a tensor of shape ``(len(quantiles), *site_shape)``.

        Example:
            >>> pyro.clear_param_store()  # no parameters of an earlier guide named AutoFlow
            >>> guide = AutoFlow(lambda: pyro.sample("a", dist.Normal(0.0, 1.0)), flow="maf")
            >>> guide.quantiles([0.25, 0.5, 0.75])["a"].shape
            torch.Size([3])
        """
        if self.prototype_trace is None:
            self(*args, **kwargs)  # sets the guide up inside Pyro's module context
        levels = torch.as_tensor(quantiles, dtype=self.loc.dtype, device=self.loc.device)
        if levels.dim() != 1 or levels.numel() == 0:
            raise ValueError(f"quantiles must be a non-empty 1-D sequence, got {quantiles!r}")
        if not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(f"quantiles must lie in [0, 1], got {quantiles!r}")
        draws = self.get_posterior(*args, **kwargs).sample((self.num_quantile_samples,))
        latents = torch.quantile(draws, levels, dim=0)  # (len(quantiles), D)
        result: dict[str, list[Tensor]] = {}
        for latent in latents:
            for site, unconstrained in self._unpack_latent(latent):
                result.setdefault(site["name"], []).append(
                    biject_to(site["fn"].support)(unconstrained)
                )
        return {name: torch.stack(values) for name, values in result.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Monte Carlo estimate of the posterior median of every latent site.

        The 0.5 level of :meth:`quantiles` (``self.num_quantile_samples`` draws, the
        coordinate-wise median of the unconstrained latent mapped to each support).

        Returns:
            a dict from site name to a tensor of the site's shape.

        Example:
            >>> pyro.clear_param_store()
            >>> guide = AutoFlow(lambda: pyro.sample("a", dist.LogNormal(0.0, 1.0)), flow="iaf")
            >>> bool(guide.median()["a"] > 0)
            True
        """
        return {name: value[0] for name, value in self.quantiles([0.5], *args, **kwargs).items()}


def _param_name(guide: AutoGuide, attribute: str) -> str:
    """The param-store name of a guide's attribute (``"AutoFlow.loc"`` for a top-level guide)."""
    return f"{guide._pyro_name}.{attribute}" if guide._pyro_name else attribute


def _check_stored_shapes(expected: dict[str, torch.Size]) -> None:
    """Raise a ``ValueError`` if the param store holds one of these names at another shape.

    That happens when a guide of the same name was built for another model (e.g.
    another latent size) and the store was not cleared in between; without this check
    the stale values would be adopted and fail later as a shape error deep inside a
    transform.
    """
    store = pyro.get_param_store()
    for name, shape in expected.items():
        if name in store and store.get_param(name).shape != shape:
            raise ValueError(
                f"the Pyro parameter store holds {name!r} with shape "
                f"{tuple(store.get_param(name).shape)}, but this guide needs {tuple(shape)}: "
                "the store holds the parameters of an earlier guide of the same name, built "
                "for another model or flow. Call pyro.clear_param_store() before creating "
                "this guide, or load the store saved for this model."
            )


def _adopt_stored_parameters(name: str, module: nn.Module) -> None:
    """Make ``module``'s parameters the param store's tensors of the same names.

    After ``ParamStoreDict.load`` the store holds the trained values. Pyro registers a
    plain ``nn.Module`` inside a guide with ``update_module_params=False``: the module
    keeps its fresh initialization and the loaded tensors, which the optimizer trains,
    are never read. Here the module's parameters *become* the stored tensors (after a
    shape check), so the restored guide computes with them and training moves them.
    """
    _check_stored_shapes(
        {param_with_module_name(name, key): p.shape for key, p in module.named_parameters()}
    )
    pyro.module(name, module, update_module_params=True)


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real
