"""Inference with flows: autoguides, amortized guides, diagnostics and fit helpers.

Example:
    >>> import pyro.distributions as dist
    >>> def model():
    ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = pyro_nf.infer.AutoFlow(model, flow="iaf", num_layers=1, hidden_dims=(8,))
    >>> guide()["z"].shape
    torch.Size([2])
"""

from pyro_nf.infer import targets
from pyro_nf.infer.amortized import (
    AmortizedAffine,
    AmortizedFlowGuide,
    FeatureEncoder,
    first_argument_rows,
)
from pyro_nf.infer.autoguide import FLOW_FAMILIES, AutoFlow, PathDerivativeDistribution
from pyro_nf.infer.data import ArrayDataset, NpyBatches
from pyro_nf.infer.diagnostics import (
    PSISResult,
    importance_draws,
    psis_diagnostic,
    to_inference_data,
)
from pyro_nf.infer.flow_matching import flow_matching_loss
from pyro_nf.infer.guide_training import (
    GUIDE_BUDGETS,
    annealed_inverse_temperature,
    fit_guide,
    temper_likelihood,
)
from pyro_nf.infer.mixture import EqualMixture, StratifiedMixture
from pyro_nf.infer.mixture_elbo import MixtureELBO, elbo_for_guide
from pyro_nf.infer.training import FIT_OBJECTIVES, FitHistory, NonFiniteLossError, fit

__all__ = [
    "FIT_OBJECTIVES",
    "FLOW_FAMILIES",
    "GUIDE_BUDGETS",
    "AmortizedAffine",
    "AmortizedFlowGuide",
    "ArrayDataset",
    "AutoFlow",
    "EqualMixture",
    "FeatureEncoder",
    "FitHistory",
    "MixtureELBO",
    "NonFiniteLossError",
    "NpyBatches",
    "PSISResult",
    "PathDerivativeDistribution",
    "StratifiedMixture",
    "annealed_inverse_temperature",
    "elbo_for_guide",
    "first_argument_rows",
    "fit",
    "fit_guide",
    "flow_matching_loss",
    "importance_draws",
    "psis_diagnostic",
    "targets",
    "temper_likelihood",
    "to_inference_data",
]
