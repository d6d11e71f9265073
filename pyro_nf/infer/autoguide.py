"""Flow autoguides: a normalizing-flow posterior over all latent sites of a Pyro model.

:class:`AutoFlow` is an ``AutoContinuous`` guide: it concatenates every latent site, in
its unconstrained space, into one vector of size D and gives it the posterior

.. math::
    u \\sim \\mathcal N(0, I_D), \\qquad y = f_K \\circ \\dots \\circ f_1(u), \\qquad
    \\theta_{\\text{unconstrained}} = \\mu + L\\, y

with flow layers ``f_k`` that start near the identity and an affine layer whose
location ``mu`` starts at the model's init location and whose lower-triangular scale
``L`` starts at ``init_scale`` (1.0) times the identity: the guide starts as a
standard-width Gaussian at a sensible point and the flow learns the shape. ``L`` is
diagonal (``affine="diagonal"``) or lower triangular (``affine="triangular"``, the
default of the autoregressive families, and of real NVP above 16 latents): a
full-covariance Gaussian around the flow. The defaults that depend on the family and the
latent size (the layers' coupling functions, the affine layer, the gradient estimator)
are :func:`guide_flow_defaults` and :func:`guide_training_defaults`.

The amortized guide of local latents, :class:`~pyro_nf.infer.amortized.AmortizedFlowGuide`,
lives in :mod:`pyro_nf.infer.amortized`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import LowerCholeskyAffine
from pyro.infer.autoguide import AutoContinuous, AutoGuide
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam
from pyro.params.param_store import param_with_module_name
from torch import Tensor, nn
from torch.distributions import Transform, biject_to
from torch.distributions.transforms import AffineTransform, ComposeTransform

from pyro_nf import flows  # noqa: F401 (the doctests' namespace)
from pyro_nf.flows import FLOW_BUILDERS, FLOW_STUDENT_T_INIT_DF, Flow, flow_builder
from pyro_nf.infer.mixture import StratifiedMixture
from pyro_nf.transforms.base import FlowTransform

__all__ = [
    "FLOW_FAMILIES",
    "GUIDE_AFFINES",
    "GUIDE_AFFINE_DEFAULTS",
    "GUIDE_BASES",
    "GUIDE_GRADIENTS",
    "GUIDE_MIXTURE_WEIGHTS",
    "GUIDE_CNF_LARGE_BLOCKS",
    "GUIDE_CNF_LARGE_INIT",
    "GUIDE_CNF_LARGE_TOL",
    "GUIDE_PATH_ALL",
    "GUIDE_PATH_LARGE",
    "GUIDE_PATH_MAX_DIM",
    "GUIDE_REALNVP_LARGE_LAYERS",
    "GUIDE_REALNVP_LARGE_PERMUTATION",
    "GUIDE_REALNVP_LU_MAX_DIM",
    "GUIDE_REALNVP_NO_GLUE_LAYERS",
    "GUIDE_SPLINE_INTERLEAVED",
    "GUIDE_SPLINE_STACKS",
    "GUIDE_SMALL_FINAL_MULTIPLIER",
    "GUIDE_FINAL_MULTIPLIER_FAMILIES",
    "GUIDE_SMALL_MAX_DIM",
    "AutoFlow",
    "PathDerivativeDistribution",
    "TriangularAffine",
    "guide_flow_defaults",
    "guide_training_defaults",
    "interleaved_coupling_functions",
    "paired_coupling_functions",
    "triangular_scale",
]

#: The base distributions ``AutoFlow(model, base=...)`` accepts.
GUIDE_BASES: tuple[str, ...] = ("normal", "student_t")

#: The final affine layers ``AutoFlow(model, affine=...)`` accepts.
GUIDE_AFFINES: tuple[str, ...] = ("diagonal", "triangular")

#: The final affine layer of a named flow family when ``affine`` is not given, chosen on
#: the posterior suite (``docs/benchmarks/posteriors.md``); every other flow gets
#: ``"diagonal"``, except the larger guides of :data:`GUIDE_PATH_LARGE`
#: (:func:`guide_training_defaults`).
GUIDE_AFFINE_DEFAULTS: dict[str, str] = {"iaf": "triangular", "maf": "triangular"}

#: The gradient estimators ``AutoFlow(model, gradient=...)`` accepts.
GUIDE_GRADIENTS: tuple[str, ...] = ("total", "path")

#: The weights of a mixture guide's components, ``AutoFlow(model, components=K,
#: mixture_weights=...)``: ``"equal"`` (1/K each) or ``"learned"`` (softmax of the
#: parameter ``mixture_logits``, trained by :class:`~pyro_nf.infer.MixtureELBO`).
GUIDE_MIXTURE_WEIGHTS: tuple[str, ...] = ("equal", "learned")

#: The initial degrees of freedom of a ``base="student_t"`` guide: tails a little
#: heavier than the normal's, which training can make heavier (or lighter).
STUDENT_T_INIT_DF = FLOW_STUDENT_T_INIT_DF

#: The family names ``AutoFlow(model, flow=name)`` accepts: the keys of
#: :data:`pyro_nf.flows.FLOW_BUILDERS` (kept as a public alias of that registry).
FLOW_FAMILIES: tuple[str, ...] = tuple(FLOW_BUILDERS)

#: Latent dimensions above which a ``"cnf"`` guide estimates the divergence with
#: Hutchinson's estimator (an exact trace costs one backward pass per dimension).
CNF_EXACT_TRACE_MAX_DIM = 16


#: The named flow families whose guides interleave spline layers with affine ones when
#: no coupling function is given (:func:`interleaved_coupling_functions`).
GUIDE_SPLINE_INTERLEAVED: tuple[str, ...] = ("iaf", "maf")

#: The ``final_multiplier`` of the MADE conditioners of ``"iaf"`` and ``"maf"`` guides
#: of up to :data:`GUIDE_SMALL_MAX_DIM` latents (:class:`~pyro_nf.nn.MADE`): the final
#: layers' weights enter multiplied by 1/8 (1/sqrt of the default 64 hidden units)
#: and start divided by it, so the guide starts where it did and Adam's first steps,
#: which move every weight by about the learning rate, move it 8 times less far. At lr
#: 1e-2 one step of the full-size stack moved the draws of a 2-D guide by about 0.9 of
#: their scale, so which mode of a two-mode posterior it kept was settled in the first
#: steps. On the bimodal target's 24 cells (four axes, seeds 0 to 5) it lowers the mean
#: KL of iaf from 0.375 to 0.271 and of maf from 0.414 to 0.253, level with Pyro's
#: spline guide's 0.262, for up to 0.11 nats on the centred schools; above 16 latents
#: the same step size (set through the learning rate) lost 0.5 to 0.7 nats on the
#: logistic regression and radon in 1000 steps (``docs/benchmarks/posteriors.md``).
#: Chosen for SVI: as a NeuTra reparametrization of the 10-d funnel the guide made NUTS
#: 30-45% slower per effective draw (``docs/examples/neutra-hmc.md``; pass 1.0 there).
GUIDE_SMALL_FINAL_MULTIPLIER = 0.125

#: The named flow families whose guides of up to :data:`GUIDE_SMALL_MAX_DIM` latents
#: build every conditioner (MADEs; real NVP's MLPs) with
#: :data:`GUIDE_SMALL_FINAL_MULTIPLIER`. For real NVP it counts together with the spline
#: layers of :func:`paired_coupling_functions`. Mean KL over the bimodal target's twelve
#: cells of seeds 0 to 2 (four axes of the modes): four affine couplings 0.516, with the
#: multiplier 0.408, the spline pair without it 0.419, both 0.316 (Pyro's spline guide:
#: 0.257); in the spline layers alone the multiplier gave 0.440 over 36 cells
#: (``docs/benchmarks/posteriors.md``).
GUIDE_FINAL_MULTIPLIER_FAMILIES: tuple[str, ...] = ("iaf", "maf", "realnvp")

#: The largest latent dimension that gets the small-latent guide defaults; above it the
#: defaults change (:func:`guide_flow_defaults`, :func:`guide_training_defaults`):
#:
#: - iaf and maf guides lose their spline layers. A spline layer's conditioner outputs
#:   ``D (3K + 1)`` numbers against an affine layer's ``2D``, so the stack's SVI step
#:   costs more as ``D`` grows (``benchmarks/svi_steps.py``, K = 16: 1.2-1.4x the affine
#:   stack's at D = 2, 1.4-1.5x at 10 and 16, 1.6x at 31, 2.8x at 100), and on the
#:   posterior suite's 31- and 100-dimensional targets they gained nothing for that cost.
#: - realnvp guides get the triangular affine layer and the path-derivative gradient,
#:   which together put them ahead of Pyro's best guide on those two targets (1.9 and
#:   1.3 nats ahead of the diagonal layer and the total gradient at seed 0), where each
#:   alone lost on the small targets; maf guides (triangular already) get the path gradient, 0.6
#:   and 1.7 nats ahead of the total gradient there (``docs/benchmarks/posteriors.md``);
#:   cnf guides get both too, 0.5 and 0.9 nats ahead of the diagonal layer and the total
#:   gradient there; iaf guides get the path gradient up to :data:`GUIDE_PATH_MAX_DIM`.
GUIDE_SMALL_MAX_DIM = 16

#: The named flow families whose guides above :data:`GUIDE_SMALL_MAX_DIM` latents get the
#: triangular affine layer and the path-derivative gradient (:func:`guide_training_defaults`),
#: up to :data:`GUIDE_PATH_MAX_DIM` where it names the family. realnvp and maf score a
#: draw's path gradient with one pass of their cheap density direction, cnf with one more
#: ODE solve, iaf with ``D`` sequential passes per layer.
GUIDE_PATH_LARGE: tuple[str, ...] = ("realnvp", "maf", "cnf", "iaf")

#: The largest latent size at which a family of :data:`GUIDE_PATH_LARGE` gets the path
#: gradient, for the families whose path gradient costs more with ``D``. An iaf guide's
#: step with it costs 5.5x the total gradient's at 31 latents, 10x at 100, 11x at 300 and
#: 17x at 1000 (``benchmarks/svi_steps.py``, 7 s a step there); on the suite's 31- and 100-latent
#: targets it bought 0.5-0.6 and 1.0-1.6 nats of ELBO and all three moment bars on radon
#: (``docs/benchmarks/posteriors.md``). Above 100, the largest size measured, iaf keeps
#: its cheap total gradient; ``AutoFlow(model, gradient="path")`` asks for it.
GUIDE_PATH_MAX_DIM: dict[str, int] = {"iaf": 100}

#: The named flow families whose guides train with the path-derivative gradient at every
#: latent size (the affine layer stays :data:`GUIDE_AFFINE_DEFAULTS`' up to
#: :data:`GUIDE_SMALL_MAX_DIM`). For cnf guides of up to 16 latents the path gradient
#: cut the banana's KL from 0.040 / 0.036 to 0.010 / 0.008 (seeds 0 / 1), raised the
#: funnel's and the centred schools' ELBO and kept both modes of the bimodal target
#: (``docs/benchmarks/posteriors.md``), where for real NVP it lost one.
GUIDE_PATH_ALL: tuple[str, ...] = ("cnf",)

#: The number of coupling layers of a ``"realnvp"`` guide from :data:`GUIDE_SMALL_MAX_DIM`
#: + 1 up to :data:`GUIDE_REALNVP_LU_MAX_DIM` latents (the builder's default, 4, below;
#: :data:`GUIDE_REALNVP_NO_GLUE_LAYERS` above), with
#: :data:`GUIDE_REALNVP_LARGE_PERMUTATION` glue layers between them. On the posterior suite's 100-latent target (radon) eight
#: layers are ahead of six at five of five seeds (by 0.30 to 0.51 nats) and meet all
#: three moment bars at every seed (k-hat 0.34 to 0.56, against 0.55 to 0.82 with six);
#: on the 31-latent logistic regression they tie (``docs/benchmarks/posteriors.md``).
#: Without glue layers eight layers diverged at lr 1e-2 on radon.
GUIDE_REALNVP_LARGE_LAYERS = 8

#: The glue layer between the couplings of a ``"realnvp"`` guide from
#: :data:`GUIDE_SMALL_MAX_DIM` + 1 up to :data:`GUIDE_REALNVP_LU_MAX_DIM` latents (none
#: outside that range; below it, the builder's default): a learned
#: :class:`~pyro_nf.transforms.LULinear`. Half masks that alternate without glue keep
#: the same two groups of coordinates in every layer, so two coordinates of one group
#: never condition each other; the LU layer mixes them. On the suite's 31- and
#: 100-latent targets, with six coupling layers each, it is ahead of the glue-less stack
#: at five of five seeds on the logistic regression (by 0.9 to 1.3 nats) and four of
#: five on radon, and meets radon's k-hat bar at three seeds of five against one; below
#: 16 latents it loses the funnel and one mode of the bimodal target
#: (``docs/benchmarks/posteriors.md``).
GUIDE_REALNVP_LARGE_PERMUTATION = "lu"

#: The largest latent size at which a ``"realnvp"`` guide gets
#: :data:`GUIDE_REALNVP_LARGE_LAYERS` couplings with :data:`GUIDE_REALNVP_LARGE_PERMUTATION`
#: glue layers, the largest size the suite measures. An LU layer holds D^2 parameters:
#: at 1000 latents the guide has 15.8M of them and a step takes 15 times the glue-less
#: one, at 3000 137M and 14 s (``docs/benchmarks/posteriors.md``). Above it the guide
#: keeps :data:`GUIDE_REALNVP_NO_GLUE_LAYERS` couplings without glue layers.
GUIDE_REALNVP_LU_MAX_DIM = 100

#: The number of coupling layers of a ``"realnvp"`` guide above
#: :data:`GUIDE_REALNVP_LU_MAX_DIM` latents, without glue layers: the default of guides
#: above 16 latents before the LU glue layers (on the suite's 31- and 100-latent targets
#: ahead of Pyro's best guide at five of five seeds; the suite has no larger target).
GUIDE_REALNVP_NO_GLUE_LAYERS = 6

#: The number of ODE blocks of a ``"cnf"`` guide above :data:`GUIDE_SMALL_MAX_DIM`
#: latents (the builder's default, 1, below it). With :data:`GUIDE_CNF_LARGE_INIT` and
#: :data:`GUIDE_CNF_LARGE_TOL` two blocks put the CNF guide ahead of Pyro's best guide at
#: three of three seeds on the posterior suite's 31-latent logistic regression (by 0.94
#: to 1.25 nats) and 100-latent radon model (by 0.49 to 1.23), where one block at the
#: builder's initialisation was 0.31 and 0.54 behind at seed 0; one block at PyTorch's
#: initialisation stayed behind (``docs/benchmarks/posteriors.md``).
GUIDE_CNF_LARGE_BLOCKS = 2

#: The hidden layers' initialisation (``ODEDynamics(init=...)``) of a ``"cnf"`` guide's
#: fields above :data:`GUIDE_SMALL_MAX_DIM` latents: PyTorch's, under which the field
#: starts almost independent of the state, so the guide starts as the Gaussian of its
#: affine layer and learns the couplings the posterior has. The variance-preserving
#: default (``"preserve"``, chosen for density models) starts the field as a strongly
#: nonlinear random function of all coordinates; on the posterior suite's 100-latent
#: radon model ``"torch"`` takes the two-block CNF guide from 0.35-0.66 nats behind
#: Pyro's best guide to ahead at three of three seeds, and on the 31-latent logistic
#: regression from 0.13-0.39 ahead to 0.94-1.25 ahead; on the 2-D targets it lost (banana KL 0.109 against 0.040,
#: bimodal 0.448 against 0.062), so smaller guides keep ``"preserve"``
#: (``docs/benchmarks/posteriors.md``).
GUIDE_CNF_LARGE_INIT = "torch"

#: The training tolerances (``rtol = atol``) of a ``"cnf"`` guide above
#: :data:`GUIDE_SMALL_MAX_DIM` latents (``1e-3`` below it). With
#: :data:`GUIDE_CNF_LARGE_INIT` the field learns fast enough at a constant lr 1e-2 to
#: turn stiff within 100 steps on the 100-latent radon model, and at ``1e-3`` the
#: solver's error in the log-determinant then grew until the loss fell far below
#: ``-log Z`` (an ELBO that is not a bound), then the solve failed; at ``1e-4`` the same
#: run trains without either (``docs/benchmarks/posteriors.md``).
GUIDE_CNF_LARGE_TOL = 1e-4

#: Builder arguments that choose the coupling functions; given any of them, a guide
#: keeps the builder's own choice instead of the interleaved default.
_COUPLING_ARGUMENTS = frozenset({"coupling_function", "coupling", "coupling_kwargs"})


def interleaved_coupling_functions(num_layers: int) -> list[str]:
    """Affine layers with rational-quadratic spline layers between them.

    Layer ``i`` (from the base) is ``"affine"`` for even ``i`` and ``"spline"`` for odd
    ``i``, so the first and the last layers are affine: ``["affine", "spline",
    "affine", "spline", "affine"]`` for five layers.

    Why: an affine layer moves and scales a coordinate given the others but cannot split
    it by its own sign, so a guide of affine layers that starts near the identity must
    find a two-mode split through another coordinate, a direction with almost no
    gradient at the start; a spline layer bends the coordinate itself. The affine
    layers keep the large, context-dependent changes of scale (a funnel's) that a
    spline, which maps its interval onto itself, cannot make.

    Example:
        >>> interleaved_coupling_functions(3)
        ['affine', 'spline', 'affine']
    """
    return ["spline" if i % 2 else "affine" for i in range(num_layers)]


def paired_coupling_functions(num_layers: int) -> list[str]:
    """Rational-quadratic spline couplings for the first pair of layers, affine after.

    Layer ``i`` counts from the base (the flow maps z -> x through layers 0, 1, ...). A
    coupling flow's consecutive layers transform the two halves of the coordinates in
    turn, so a pair of layers transforms each coordinate once. With four layers this
    is ``["spline", "spline", "affine", "affine"]``: every coordinate is first bent by a
    spline, which can split its mass by its own value (two modes), then moved and
    scaled by affine couplings, which make the large changes of scale a spline, mapping
    its interval onto itself, cannot. Alternating single layers (``"spline",
    "affine", ...``) would give the splines to one half only. Fewer than four layers
    stay affine (no room for both pairs): with three, spline, spline, affine leaves one
    half without an affine coupling, and on the posterior suite's funnel its KL was
    1.48 against 0.58-0.70 for three affine couplings (``docs/benchmarks/posteriors.md``).

    Example:
        >>> paired_coupling_functions(4)
        ['spline', 'spline', 'affine', 'affine']
        >>> paired_coupling_functions(3)
        ['affine', 'affine', 'affine']
    """
    if num_layers < 4:
        return ["affine"] * num_layers
    return ["spline"] * 2 + ["affine"] * (num_layers - 2)


#: The coupling-function stack of each named family's guides of up to
#: :data:`GUIDE_SMALL_MAX_DIM` latents when the user gives no coupling argument, as a
#: function of the number of layers: :func:`interleaved_coupling_functions` for the
#: autoregressive families (:data:`GUIDE_SPLINE_INTERLEAVED`; one layer transforms every
#: coordinate), :func:`paired_coupling_functions` for real NVP (one layer transforms
#: half of them). On the bimodal target's 36 cells (four axes of the modes, seeds 0 to
#: 8) real NVP's pairs with :data:`GUIDE_SMALL_FINAL_MULTIPLIER` have mean KL 0.269 and
#: one mode in 4 cells, against 0.557 and 22 for four affine couplings and Pyro's
#: spline guide's 0.265 and 4 (``docs/benchmarks/posteriors.md``).
GUIDE_SPLINE_STACKS: dict[str, Callable[[int], list[str]]] = {
    **dict.fromkeys(GUIDE_SPLINE_INTERLEAVED, interleaved_coupling_functions),
    "realnvp": paired_coupling_functions,
}


def guide_training_defaults(family: str | None, dim: int) -> dict[str, str]:
    """The ``affine`` layer and the ``gradient`` a guide gets when the user gives neither.

    ``family`` is the flow's name, or ``None`` for a flow callable. ``affine``:
    :data:`GUIDE_AFFINE_DEFAULTS` (``"triangular"`` for iaf and maf, else
    ``"diagonal"``); ``gradient``: ``"path"`` for the families of
    :data:`GUIDE_PATH_ALL` (``"cnf"``), else ``"total"``. Above
    :data:`GUIDE_SMALL_MAX_DIM` latents the families of :data:`GUIDE_PATH_LARGE`
    (``"realnvp"``, ``"maf"``, ``"cnf"`` and, up to ``GUIDE_PATH_MAX_DIM["iaf"] = 100``
    latents, ``"iaf"``) get ``"triangular"`` and ``"path"``.

    Example:
        >>> guide_training_defaults("realnvp", 10)
        {'affine': 'diagonal', 'gradient': 'total'}
        >>> guide_training_defaults("realnvp", 31)
        {'affine': 'triangular', 'gradient': 'path'}
        >>> guide_training_defaults("cnf", 10)
        {'affine': 'diagonal', 'gradient': 'path'}
        >>> guide_training_defaults("iaf", 100), guide_training_defaults("iaf", 101)["gradient"]
        ({'affine': 'triangular', 'gradient': 'path'}, 'total')
    """
    path_max_dim = GUIDE_PATH_MAX_DIM.get(family or "", math.inf)
    if family in GUIDE_PATH_LARGE and GUIDE_SMALL_MAX_DIM < dim <= path_max_dim:
        return {"affine": "triangular", "gradient": "path"}
    gradient = "path" if family in GUIDE_PATH_ALL else "total"
    return {"affine": GUIDE_AFFINE_DEFAULTS.get(family, "diagonal"), "gradient": gradient}


def guide_flow_defaults(
    family: str, dim: int, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    r"""The builder arguments ``AutoFlow`` passes for ``family`` unless the user gives them.

    Chosen on the posterior suite (``benchmarks/posteriors.py``, table in
    ``docs/benchmarks/posteriors.md``); the builders' own defaults serve density models.
    ``options`` are the user's builder arguments, which some defaults depend on.

    - ``"iaf"``, ``"maf"`` and ``"realnvp"`` up to :data:`GUIDE_SMALL_MAX_DIM` latent
      dimensions: the spline stack of :data:`GUIDE_SPLINE_STACKS` for the stack's
      ``num_layers`` (the user's, else the builder's; iaf and maf
      :func:`interleaved_coupling_functions`, realnvp
      :func:`paired_coupling_functions`), unless the user chose the coupling functions
      (``coupling_function`` or ``coupling_kwargs``). Above it, affine layers only (the
      builder's default). Up to the same size the conditioners of
      :data:`GUIDE_FINAL_MULTIPLIER_FAMILIES` get :data:`GUIDE_SMALL_FINAL_MULTIPLIER`
      unless the user gives ``final_multiplier``.
    - ``"cnf"``: dynamics that scale the state (``state_scale=True``: fields
      :math:`s \odot z + m`, which on the funnel put the guide ahead of Pyro's best guide
      on three of three seeds, by 0.92, 0.14 and 0.02 nats of ELBO, where the plain field
      was 0.38 behind at seed 0), training tolerances ``rtol = atol = 1e-3`` (up to
      :data:`GUIDE_SMALL_MAX_DIM` latents) and backpropagation through the solver (the
      builder's ``1e-5`` and adjoint cost about 13x per step on a 100-dimensional
      latent), and
      Hutchinson's trace above :data:`CNF_EXACT_TRACE_MAX_DIM` dimensions; above
      :data:`GUIDE_SMALL_MAX_DIM` latents :data:`GUIDE_CNF_LARGE_BLOCKS` ODE blocks unless
      the user gives ``num_layers`` (or ``num_blocks``), fields initialised as
      :data:`GUIDE_CNF_LARGE_INIT` and training tolerances :data:`GUIDE_CNF_LARGE_TOL`.
    - ``"realnvp"`` above :data:`GUIDE_SMALL_MAX_DIM` latent dimensions:
      :data:`GUIDE_REALNVP_LARGE_LAYERS` coupling layers and
      :data:`GUIDE_REALNVP_LARGE_PERMUTATION` glue layers up to
      :data:`GUIDE_REALNVP_LU_MAX_DIM` latents, :data:`GUIDE_REALNVP_NO_GLUE_LAYERS`
      coupling layers above, unless the user gives ``num_layers`` or ``permutation``.

    The guide's own defaults, the affine layer after the flow and the gradient
    estimator, are :func:`guide_training_defaults` (not builder arguments).

    Example:
        >>> guide_flow_defaults("cnf", 100)["trace"]
        'hutchinson'
        >>> guide_flow_defaults("cnf", 100)["num_layers"], guide_flow_defaults("cnf", 100)["init"]
        (2, 'torch')
        >>> guide_flow_defaults("iaf", 10, {"num_layers": 3})
        {'coupling_function': ['affine', 'spline', 'affine'], 'final_multiplier': 0.125}
        >>> guide_flow_defaults("iaf", 10, {"coupling_function": "affine"})
        {'final_multiplier': 0.125}
        >>> guide_flow_defaults("iaf", 100)
        {}
        >>> guide_flow_defaults("realnvp", 2)
        {'coupling_function': ['spline', 'spline', 'affine', 'affine'], 'final_multiplier': 0.125}
        >>> guide_flow_defaults("realnvp", 100)
        {'num_layers': 8, 'permutation': 'lu'}
        >>> guide_flow_defaults("realnvp", 1000)
        {'num_layers': 6}
    """
    options = options or {}
    large = dim > GUIDE_SMALL_MAX_DIM
    if family == "cnf":
        defaults = {
            "state_scale": True,
            "rtol": 1e-3,
            "atol": 1e-3,
            "adjoint": False,
            "trace": "exact" if dim <= CNF_EXACT_TRACE_MAX_DIM else "hutchinson",
        }
        if large:
            defaults["init"] = GUIDE_CNF_LARGE_INIT
            defaults["rtol"] = defaults["atol"] = GUIDE_CNF_LARGE_TOL
            if not {"num_layers", "num_blocks"} & options.keys():
                defaults["num_layers"] = GUIDE_CNF_LARGE_BLOCKS
        return defaults
    if family == "realnvp" and large:
        if dim <= GUIDE_REALNVP_LU_MAX_DIM:
            defaults = {
                "num_layers": GUIDE_REALNVP_LARGE_LAYERS,
                "permutation": GUIDE_REALNVP_LARGE_PERMUTATION,
            }
        else:
            defaults = {"num_layers": GUIDE_REALNVP_NO_GLUE_LAYERS}
        return {name: value for name, value in defaults.items() if name not in options}
    defaults: dict[str, Any] = {}
    small = dim <= GUIDE_SMALL_MAX_DIM
    stack = GUIDE_SPLINE_STACKS.get(family)
    if small and stack is not None and not _COUPLING_ARGUMENTS & options.keys():
        num_layers = options.get(
            "num_layers", inspect.signature(flow_builder(family)).parameters["num_layers"].default
        )
        if isinstance(num_layers, int) and num_layers >= 1:  # else the builder's error
            defaults["coupling_function"] = stack(num_layers)
    if small and family in GUIDE_FINAL_MULTIPLIER_FAMILIES and "final_multiplier" not in options:
        defaults["final_multiplier"] = GUIDE_SMALL_FINAL_MULTIPLIER
    return defaults


class AutoFlow(AutoContinuous):
    r"""A normalizing-flow autoguide over all latent sites, starting at the init location.

    .. math::
        q(\theta) : \quad u \sim \mathcal N(0, I_D), \qquad
        \theta_{\text{unc}} = \mu + L\, f_K \circ \dots \circ f_1(u), \qquad
        L = \operatorname{diag}(\sigma)\,(I + W / \sqrt D)

    ``D`` is the total size of all latent sites in their unconstrained spaces (each site
    is mapped to its support by ``biject_to``). ``mu`` is initialized by
    ``init_loc_fn`` (as in ``AutoMultivariateNormal``), ``sigma`` to ``init_scale``
    (kept positive by a softplus), the strictly lower-triangular ``W`` to zero (only
    with ``affine="triangular"``; ``W = 0`` always with ``"diagonal"``) and the flow
    layers start near the identity.

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
        base: the distribution of ``u``: ``"normal"`` (default, ``N(0, I_D)``) or
            ``"student_t"``, independent ``StudentT(nu_d, 0, 1)`` with learned degrees
            of freedom ``nu_d > 1`` (starting at 10, parameter ``base_df``) for
            heavy-tailed posteriors such as funnels.
        gradient: ``"total"`` (the reparametrized gradient of ``log p - log q``) or
            ``"path"``: the path derivative ("sticking the landing"), which scores each
            draw with the parameters detached (:class:`PathDerivativeDistribution`): the
            same ELBO value, an unbiased gradient, and no score-term noise as ``q``
            approaches the posterior. The scoring runs the flow's inverse: one pass per
            layer for ``"realnvp"`` and ``"maf"``, ``D`` sequential passes per layer for
            ``"iaf"``, one more ODE solve for ``"cnf"``. The default (``None``,
            :func:`guide_training_defaults`) is ``"path"`` for ``"cnf"`` guides, for
            ``"realnvp"`` and ``"maf"`` above 16 latents and for ``"iaf"`` from 17 to
            100 latents, ``"total"`` otherwise: on the posterior suite ``"path"`` with
            the triangular layer puts every family ahead of Pyro's best guide on the
            31- and 100-latent targets (iaf by 1.3 nats more than the total gradient on
            the 100-latent one, at 10x the cost per step) and the small CNF guides
            ahead on every small target, while small real NVP, iaf and maf guides with
            ``"path"`` cover one mode of the bimodal target more often. For a posterior
            known to have one mode, ``"path"`` is the better choice at any size (the
            suite's funnel: KL 0.02-0.09 against 0.17-0.38 for a small iaf guide)
            (``docs/benchmarks/posteriors.md``).
        affine: the scale ``L`` of the affine layer after the flow: ``"diagonal"``
            (``diag(sigma)``) or ``"triangular"`` (``diag(sigma) (I + W / sqrt(D))``
            with a learned strictly lower-triangular ``W``, parameter
            ``scale_tril_offdiag``; see :func:`triangular_scale`). The default (``None``)
            is ``"triangular"`` for ``"iaf"`` and ``"maf"``, and for ``"realnvp"`` and
            ``"cnf"`` above 16 latents; ``"diagonal"`` for smaller ``"realnvp"`` and
            ``"cnf"`` guides and callables (:func:`guide_training_defaults`). On the
            posterior suite the triangular layer puts iaf ahead of Pyro's best guide on the 31-coefficient
            logistic regression (it was 0.3 nats behind) and changes the other targets of
            iaf by less than their seed-to-seed noise; for real NVP it lost the banana,
            the funnel and the bimodal target in one-seed runs
            (``docs/benchmarks/posteriors.md``).
        components: ``K``, the number of flows in the guide. ``1`` (the default) is
            one flow. ``K > 1`` is the mixture :math:`q = \sum_k w_k q_k`
            (equal weights ``w_k = 1/K`` unless ``mixture_weights="learned"``) of ``K``
            flows of the same build, each with its own flow layers, ``mu``, ``sigma``
            (and ``W``, ``nu``), drawn stratified
            (:class:`~pyro_nf.infer.StratifiedMixture`; parameters ``flow_k``,
            ``loc_k``, ... for ``k >= 1``): a guide that can put whole components on
            separate modes of a posterior. It costs about ``K`` times the parameters
            and, per step, ``K`` inverse passes of every draw (each draw is scored under
            every component; ``D`` sequential passes per layer for ``"iaf"``). Such a
            guide is not one map of one base, so ``get_transform`` (and
            ``NeuTraReparam``) needs ``components=1``. On the posterior suite's
            two-mode target (modes of equal mass) two flows take the mean KL of iaf,
            maf and realnvp guides from 0.27-0.28 to 0.08-0.14, ahead of Pyro's spline
            guide (0.38); where the masses are 3/4 and 1/4 the equal weights fit them
            as halves; on the one-mode small targets they are a trade at 2-10 times the
            training time, so the default stays 1 (``docs/benchmarks/posteriors-defaults.md``,
            "A mixture of flows").
        mixture_weights: the weights of a guide of ``K > 1`` flows: ``"equal"`` (the
            default, ``1 / K`` each) or ``"learned"``, :math:`w =
            \operatorname{softmax}(a)` of a parameter ``mixture_logits`` ``a`` (shape
            ``(K,)``, starting at 0). The draws follow ``w``
            (:class:`~pyro_nf.infer.StratifiedMixture`). The weights are trained only by
            :class:`~pyro_nf.infer.MixtureELBO` (which :func:`~pyro_nf.infer.fit_guide`
            uses for such a guide): a draw's component carries no gradient, so under a
            plain ``Trace_ELBO`` they get none and keep their values while the flows
            train. On the posterior suite's target with modes of mass 3/4 and 1/4, two
            iaf flows with learned weights through ``fit_guide`` had mean KL 0.035
            over 16 cells against 0.132 with equal weights; with equal masses 0.031
            against 0.057 (``docs/benchmarks/posteriors-defaults.md``, "Learned mixture
            weights").
        **flow_kwargs: keyword arguments of the builder (e.g. ``num_layers``,
            ``hidden_dims``), over :func:`guide_flow_defaults`. Among those defaults: an
            ``"iaf"`` or ``"maf"`` guide of up to 16 latents alternates affine and
            spline layers (affine first and last, :func:`interleaved_coupling_functions`),
            and a ``"realnvp"`` guide of that size has spline couplings in its first
            pair of layers and affine ones after (:func:`paired_coupling_functions`):
            both cover both modes of the posterior suite's two-mode target more often
            than affine layers alone; ``coupling_function="affine"`` gives the affine
            stack.

    Raises:
        ValueError: for an unknown flow name, base or gradient, a non-positive
            ``init_scale`` or ``components``, an unknown ``affine`` or
            ``mixture_weights``, or ``mixture_weights="learned"`` with one component (at
            construction); for a flow that cannot be built at the latent dimension,
            e.g. ``"realnvp"`` for a single latent dimension, or for a flow callable
            that returns one module for two components (at the first call).

    References:
        Variational Inference with Normalizing Flows (Rezende and Mohamed, 2015),
        arXiv:1505.05770. Improved Variational Inference with Inverse Autoregressive
        Flow (Kingma et al., 2016), arXiv:1606.04934. Sticking the Landing: Simple,
        Lower-Variance Gradient Estimators for Variational Inference (Roeder et al.,
        2017), arXiv:1703.09194. Automatic Differentiation Variational Inference with
        Mixtures (Morningstar et al., 2021), arXiv:2003.01687.

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
        *,
        base: str = "normal",
        gradient: str | None = None,
        affine: str | None = None,
        components: int = 1,
        mixture_weights: str = "equal",
        **flow_kwargs: Any,
    ) -> None:
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive integer, got {components!r}")
        if mixture_weights not in GUIDE_MIXTURE_WEIGHTS:
            raise ValueError(
                f"mixture_weights must be one of {GUIDE_MIXTURE_WEIGHTS}, got {mixture_weights!r}"
            )
        if mixture_weights == "learned" and components == 1:
            raise ValueError(
                'mixture_weights="learned" needs a guide of several flows (components > 1), '
                "got components=1"
            )
        if affine is not None and affine not in GUIDE_AFFINES:
            raise ValueError(f"affine must be one of {GUIDE_AFFINES}, got {affine!r}")
        if base not in GUIDE_BASES:
            raise ValueError(f"base must be one of {GUIDE_BASES}, got {base!r}")
        if gradient is not None and gradient not in GUIDE_GRADIENTS:
            raise ValueError(f"gradient must be one of {GUIDE_GRADIENTS}, got {gradient!r}")
        self._base = base
        # ``None``: chosen by guide_training_defaults when the latent size is known.
        self._affine_option, self._gradient_option = affine, gradient
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
        self._components = components
        self._mixture_weights = mixture_weights
        # True only inside MixtureELBO: draws in blocks per component, differentiable weights.
        self._drawing_in_blocks = False
        super().__init__(model, init_loc_fn=init_loc_fn)

    def _build_flow(self, dim: int) -> Transform | Flow:
        spec = self._flow_spec
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
        try:
            built = (
                flow_builder(spec)(
                    dim=dim,
                    **{**guide_flow_defaults(spec, dim, self._flow_kwargs), **self._flow_kwargs},
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
        family = self._flow_spec if isinstance(self._flow_spec, str) else None
        defaults = guide_training_defaults(family, self.latent_dim)
        self._affine = self._affine_option or defaults["affine"]
        self._gradient = self._gradient_option or defaults["gradient"]
        for component in range(self._components):
            self._add_component(component, init_loc)
        if self._mixture_weights == "learned":
            logits = init_loc.new_zeros(self._components)
            _check_stored_shapes({_param_name(self, "mixture_logits"): logits.shape})
            self.mixture_logits = nn.Parameter(logits)

    def _add_component(self, component: int, init_loc: Tensor) -> None:
        """Build one component's flow and its parameters, named by
        :func:`_component_attribute` (``flow``, ``loc``, ``scale``, ... for component 0;
        ``flow_1``, ``loc_1``, ... for component 1)."""
        name = partial(_component_attribute, component=component)
        built = self._build_flow(self.latent_dim)
        if isinstance(built, nn.Module):
            if any(built is self._component(earlier, "flow") for earlier in range(component)):
                raise ValueError(
                    "the flow callable returned the same module for two components; with "
                    "components > 1 it must build a new flow at each call"
                )
            # Parameters and buffers follow the model's init locations (device, dtype).
            built = built.to(device=init_loc.device, dtype=init_loc.dtype)
        shape = init_loc.shape
        _check_stored_shapes(
            {_param_name(self, name("loc")): shape, _param_name(self, name("scale")): shape}
        )
        if isinstance(built, nn.Module):
            _adopt_stored_parameters(_param_name(self, name("flow")), built)
        setattr(self, name("flow"), built)
        setattr(self, name("loc"), nn.Parameter(init_loc.clone()))
        setattr(
            self,
            name("scale"),
            PyroParam(torch.full_like(init_loc, self._init_scale), self.scale_constraint),
        )
        if self._affine == "triangular":
            dim = init_loc.numel()
            zeros = init_loc.new_zeros(dim, dim)
            _check_stored_shapes({_param_name(self, name("scale_tril_offdiag")): zeros.shape})
            setattr(self, name("scale_tril_offdiag"), nn.Parameter(zeros))
        if self._base == "student_t":
            _check_stored_shapes({_param_name(self, name("base_df")): shape})
            setattr(
                self,
                name("base_df"),
                PyroParam(
                    torch.full_like(init_loc, STUDENT_T_INIT_DF), constraints.greater_than(1.0)
                ),
            )

    def _component(self, component: int, attribute: str) -> Any:
        """One component's ``flow``, ``loc``, ``scale``, ``scale_tril_offdiag`` or ``base_df``."""
        return getattr(self, _component_attribute(attribute, component))

    def _flow_layers(self, component: int = 0) -> list[Transform]:
        flow = self._component(component, "flow")
        if isinstance(flow, Flow):
            return flow.layers
        if isinstance(flow, ComposeTransform):
            return list(flow.parts)
        return [flow]

    def get_base_dist(self) -> dist.Distribution:
        """The base of ``u``: ``N(0, I_D)``, or independent ``StudentT(nu_d, 0, 1)`` for
        ``base="student_t"``, on the guide's device and dtype.

        Raises:
            ValueError: for a mixture guide (``components > 1``), whose posterior is not
                one map of one base.
        """
        self._check_single_map("get_base_dist")
        return self._base_dist(detach=False)

    def _base_dist(self, detach: bool, component: int = 0) -> dist.Distribution:
        loc = self._component(component, "loc")
        zeros, ones = torch.zeros_like(loc).detach(), torch.ones_like(loc).detach()
        if self._base == "student_t":
            df = self._component(component, "base_df")
            return dist.StudentT(df.detach() if detach else df, zeros, ones).to_event(1)
        return dist.Normal(zeros, ones).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> ComposeTransform:
        """The map from the base ``u`` to the unconstrained latent (flow, then affine).

        Raises:
            ValueError: for a mixture guide (``components > 1``), whose posterior is not
                one map of one base (so it cannot reparametrize a model for
                ``NeuTraReparam``).
        """
        self._check_single_map("get_transform")
        return ComposeTransform(self._component_layers(0))

    def _component_layers(self, component: int) -> list[Transform]:
        """One component's map from its base ``u`` to the unconstrained latent ``x``
        (u -> x), as layers on event shape ``(D,)``: its flow, then its affine layer
        :math:`x = \\mu_k + L_k y`."""
        return [*self._flow_layers(component), self._affine_layer(False, component)]

    def _check_single_map(self, method: str) -> None:
        if self._components > 1:
            raise ValueError(
                f"AutoFlow.{method}() needs a guide of one flow, but this guide is an "
                f"mixture of components={self._components} flows; build the "
                "guide with components=1 to use it with NeuTraReparam"
            )

    def _affine_layer(self, detach: bool, component: int = 0) -> Transform:
        loc, scale = self._component(component, "loc"), self._component(component, "scale")
        if detach:
            loc, scale = loc.detach(), scale.detach()
        if self._affine == "triangular":
            offdiag = self._component(component, "scale_tril_offdiag")
            offdiag = offdiag.detach() if detach else offdiag
            return TriangularAffine(loc, triangular_scale(scale, offdiag), cache_size=1)
        return AffineTransform(loc, scale, event_dim=1, cache_size=1)

    @property
    def num_components(self) -> int:
        """``K``, the number of flows in the guide (``components``)."""
        return self._components

    @property
    def mixture_weights(self) -> str:
        """``"equal"`` or ``"learned"``: how the guide's components are weighted."""
        return self._mixture_weights

    def get_mixture_weights(self) -> Tensor:
        """The components' weights ``w``, shape ``(K,)``: ``softmax(mixture_logits)``
        (differentiable) for ``mixture_weights="learned"``, else ``1 / K`` each, on the
        guide's device and dtype.

        Raises:
            RuntimeError: before the guide's first call, which builds its parameters.
        """
        if self.prototype_trace is None:
            raise RuntimeError(
                "AutoFlow.get_mixture_weights() needs the guide's parameters, which its "
                "first call builds: call the guide (or train it) first"
            )
        if self._mixture_weights == "learned":
            return self.mixture_logits.softmax(-1)
        return self._component(0, "loc").new_full((self._components,), 1.0 / self._components)

    def get_posterior(
        self, *args: Any, **kwargs: Any
    ) -> dist.TransformedDistribution | StratifiedMixture:
        """The posterior over the unconstrained latent vector: a
        ``TransformedDistribution`` (a :class:`PathDerivativeDistribution` with
        ``gradient="path"``), or for ``components=K > 1`` the
        :class:`~pyro_nf.infer.StratifiedMixture` of ``K`` of them with the guide's
        weights."""
        if self._components == 1:
            return self._component_posterior(0)
        components = [self._component_posterior(k) for k in range(self._components)]
        logits = None
        if self._mixture_weights == "learned":
            logits = self.mixture_logits
            # The weights' gradient is MixtureELBO's; with the path gradient the score
            # of the draws is detached from every parameter, the weights included.
            if not self._drawing_in_blocks or self._gradient == "path":
                logits = logits.detach()
        return StratifiedMixture(components, logits, blocks=self._drawing_in_blocks)

    @contextmanager
    def _draws_in_blocks(self) -> Iterator[None]:
        """Within: the posterior's draws come in one block per component, component 0
        first (:class:`~pyro_nf.infer.MixtureELBO`'s layout), and learned weights
        keep their gradient in the posterior's ``log_prob``."""
        self._drawing_in_blocks = True
        try:
            yield
        finally:
            self._drawing_in_blocks = False

    def _component_posterior(self, component: int) -> dist.TransformedDistribution:
        """One component's flow posterior :math:`q_k(x) = p_k(u)\\,|\\det \\partial x /
        \\partial u|^{-1}` with ``x = T_k(u)`` (:meth:`_component_layers`, u -> x): batch
        shape ``()``, event shape ``(D,)``."""
        layers = self._component_layers(component)
        base = self._base_dist(detach=False, component=component)
        if self._gradient == "path":
            score = partial(self._detached_log_prob, component=component)
            return PathDerivativeDistribution(base, layers, score)
        return dist.TransformedDistribution(base, layers)

    def _detached_log_prob(self, x: Tensor, component: int = 0) -> Tensor:
        """``log q(x)`` computed with every guide parameter detached (x -> u, no cache).

        The value equals the guide's ``log_prob``; its gradient reaches the parameters
        only through ``x``: the path derivative. Scoring runs the flow's inverse, one
        pass per layer for ``"realnvp"`` and ``"maf"``, ``D`` sequential passes per
        layer for ``"iaf"``, an ODE solve for ``"cnf"``.
        """
        affine = self._affine_layer(detach=True, component=component).with_cache(0)
        base = self._base_dist(detach=True, component=component)
        # A fresh tensor: the layers' caches would answer ``x`` with the ``u`` of the
        # draw, whose graph reaches the live parameters.
        fresh = x.clone()
        flow = self._component(component, "flow")
        layers = partial(self._flow_layers, component)
        if not isinstance(flow, nn.Module):
            return dist.TransformedDistribution(base, [*layers(), affine]).log_prob(fresh)
        scorer = _DetachedScorer(flow, layers)
        detached = {f"flow.{name}": p.detach() for name, p in flow.named_parameters()}
        return torch.func.functional_call(scorer, detached, (fresh, base, affine), strict=False)

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


def triangular_scale(scale: Tensor, offdiag: Tensor) -> Tensor:
    r"""The lower-triangular factor :math:`L = \operatorname{diag}(\sigma)\,(I + W / \sqrt D)`.

    ``W`` is the strictly lower triangle of ``offdiag`` (its diagonal and upper triangle
    are ignored), ``sigma`` the positive ``scale``. Row ``i`` of ``L`` is
    :math:`\sigma_i (e_i + W_{i,<i} / \sqrt D)`: the correlations are unit-free (the
    flow's output ``y`` is standardized) and every coordinate keeps its own scale, so
    :math:`\log|\det L| = \sum_i \log \sigma_i`.

    Why :math:`1/\sqrt D`: Adam moves every entry of ``W`` by about the learning rate
    per step whatever its gradient's size, and a row of ``W`` has up to ``D - 1`` entries,
    so the noise the steps add to a row grows like :math:`\sqrt D`. Dividing by
    :math:`\sqrt D` (the fan-in scaling of a dense layer) keeps that noise the same at
    every ``D``. Measured on the posterior suite (``docs/benchmarks/posteriors.md``):
    unscaled entries cost the iaf guide 1.2 nats on the 100-latent radon model
    (scaled: 0.1 nats from the diagonal guide, within seed noise).

    Shapes: ``scale`` ``(D,)``, ``offdiag`` ``(D, D)``; returns ``(D, D)``.

    Example:
        >>> triangular_scale(torch.full((2,), 2.0), torch.ones(2, 2))
        tensor([[2.0000, 0.0000],
                [1.4142, 2.0000]])
    """
    dim = scale.shape[-1]
    unit = offdiag.tril(-1) / math.sqrt(dim)
    unit = unit + torch.eye(dim, dtype=unit.dtype, device=unit.device)
    return scale[..., None] * unit


class TriangularAffine(LowerCholeskyAffine):
    r"""``x = loc + L y`` for a lower-triangular ``L`` with a positive diagonal (y -> x).

    Pyro's :class:`~pyro.distributions.transforms.LowerCholeskyAffine`, computed as
    ``y @ L.T`` so that a batch of ``B`` rows costs one ``(B, D) x (D, D)`` matrix
    product (no batch of copies of ``L``). The inverse is a triangular solve and
    :math:`\log|\det L| = \sum_i \log L_{ii}` for every row.

    Shapes: ``y`` ``(..., D)`` -> ``x`` ``(..., D)``.

    Example:
        >>> affine = TriangularAffine(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.5, 2.0]]))
        >>> affine(torch.tensor([[1.0, 1.0]]))
        tensor([[1.0000, 2.5000]])
    """

    def _call(self, y: Tensor) -> Tensor:
        return y @ self.scale_tril.mT + self.loc

    def with_cache(self, cache_size: int = 1) -> TriangularAffine:
        if self._cache_size == cache_size:
            return self
        return TriangularAffine(self.loc, self.scale_tril, cache_size=cache_size)


class PathDerivativeDistribution(dist.TransformedDistribution):
    r"""A flow posterior whose ``log_prob`` carries the path derivative only.

    ``rsample`` is the flow's reparametrized draw :math:`x = T_\phi(u)`, and
    ``log_prob(x)`` has the value :math:`\log q_\phi(x)` but is computed by
    ``score`` with :math:`\phi` detached (:math:`\log q_{\bar\phi}(x)`). The
    ELBO's gradient then keeps the path term
    :math:`\nabla_x [\log p(x) - \log q_{\bar\phi}(x)]\,\partial_\phi x` and drops
    the score term :math:`\partial_\phi \log q_\phi(x)`, whose expectation under
    ``q`` is zero (so the estimator stays unbiased) and which is pure noise when
    ``q = p``: "sticking the landing" (Roeder et al., 2017, arXiv:1703.09194).

    Shapes: as :class:`~pyro.distributions.TransformedDistribution`.

    Arguments:
        base_distribution: the base of ``u``.
        transforms: the transforms from ``u`` to ``x``.
        score: ``x -> log q(x)`` with the parameters detached.

    Example:
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> affine = AffineTransform(torch.ones(2), torch.full((2,), 2.0, requires_grad=True))
        >>> detached = dist.TransformedDistribution(
        ...     base, [AffineTransform(torch.ones(2), torch.full((2,), 2.0))]
        ... )
        >>> q = PathDerivativeDistribution(base, [affine], detached.log_prob)
        >>> x = q.rsample((3,))
        >>> bool(torch.allclose(q.log_prob(x), detached.log_prob(x)))
        True
    """

    def __init__(
        self,
        base_distribution: dist.Distribution,
        transforms: Sequence[Transform],
        score: Callable[[Tensor], Tensor],
        validate_args: bool | None = None,
    ) -> None:
        self._score = score
        super().__init__(base_distribution, list(transforms), validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: Any = None
    ) -> PathDerivativeDistribution:
        new = self._get_checked_instance(PathDerivativeDistribution, _instance)
        new._score = self._score
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """``x = T(u)``, each flow layer by its ``forward_without_log_det``.

        ``log_prob`` never reads the draw's log-determinant, so a CNF layer solves the
        state alone (:meth:`~pyro_nf.transforms.FlowTransform.forward_without_log_det`).
        """
        value = self.base_dist.rsample(sample_shape)
        for transform in self.transforms:
            if isinstance(transform, FlowTransform):
                value = transform.forward_without_log_det(value)
            else:
                value = transform(value)
        return value

    def sample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        """:meth:`rsample` without a graph, shape ``sample_shape + batch_shape + (D,)``."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        log_q = self._score(value)
        return log_q.expand(torch.broadcast_shapes(log_q.shape, self.batch_shape))


class _DetachedScorer(nn.Module):
    """Wraps a flow so that ``torch.func.functional_call`` can run it on detached parameters."""

    def __init__(self, flow: nn.Module, layers: Callable[[], list[Transform]]) -> None:
        super().__init__()
        self.flow = flow
        self._layers = layers

    def forward(self, x: Tensor, base: dist.Distribution, affine: Transform) -> Tensor:
        return dist.TransformedDistribution(base, [*self._layers(), affine]).log_prob(x)


def _component_attribute(attribute: str, component: int) -> str:
    """The attribute name of a mixture component's parameter or flow: ``attribute`` for
    component 0 (a one-flow guide's names), ``attribute_k`` for component ``k``."""
    return attribute if component == 0 else f"{attribute}_{component}"


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
