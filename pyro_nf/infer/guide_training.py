"""Train a flow guide in one call: :func:`fit_guide`, with a budget preset.

``fit_guide(model, *args, budget="default")`` trains :class:`~pyro_nf.infer.AutoFlow`
at its defaults with the posterior suite's recipe (``benchmarks/posteriors.py``);
``budget="high"`` spends more compute on a higher-capacity guide, after the recipe of
Agrawal and Domke (2024): a real NVP guide, many particles per step, the
path-derivative gradient and a small fixed Adam step for many steps. Both skip an
update whose loss or gradient is not finite (the parameters keep their last good
values) and stop after a run of such updates. ``anneal`` trains on a tempered
likelihood first (:func:`temper_likelihood`), which lets a guide spread over every mode
of a multimodal posterior before the full likelihood separates them; the ``"default"``
budget spends a fifth of its steps so, from beta 0.5, and clamps each gradient element
at 10 as Pyro's ``ClippedAdam`` does.

Example:
    >>> def model():
    ...     pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = fit_guide(model, steps=5, flow_options={"num_layers": 1, "hidden_dims": (8,)})
    >>> guide()["z"].shape
    torch.Size([2])
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import pyro.distributions as dist  # noqa: F401 (the doctests' namespace)
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_nf.infer.autoguide import AutoFlow
from pyro_nf.infer.mixture_elbo import elbo_for_guide
from pyro_nf.infer.training import NonFiniteLossError, optimization_step

__all__ = ["GUIDE_BUDGETS", "annealed_inverse_temperature", "fit_guide", "temper_likelihood"]

#: The training presets of :func:`fit_guide` by name. ``flow`` and ``flow_options``
#: build the :class:`AutoFlow`; ``steps``, ``num_particles``, ``lr`` and ``final_lr``
#: (Adam, decayed exponentially from ``lr`` to ``final_lr``), ``gradient`` and the
#: annealing (``anneal``, ``anneal_start``: see :func:`fit_guide`) and the clamp of the
#: gradient's elements (``gradient_clip``) train it; ``mixture_weights`` is the weights
#: of a guide of several flows when ``flow_options`` gives ``components > 1`` and no
#: weights (``"learned"``: :class:`~pyro_nf.infer.MixtureELBO` trains them), and
#: ``hold_weights_while_annealing`` whether learned weights wait for the annealing's end.
#: ``"default"`` is the posterior suite's budget with ``AutoFlow``'s defaults, a
#: fifth of the steps on the tempered likelihood, beta rising from 0.5, and the
#: gradient's elements clamped at 10 as by the suite's ``ClippedAdam`` (measured in
#: ``docs/benchmarks/posteriors-defaults.md``, "Annealing the likelihood");
#: ``"high"`` is the high-compute recipe measured in ``docs/benchmarks/posteriors.md``,
#: real NVP without glue layers, with affine couplings and no final multiplier, as
#: measured (``AutoFlow``'s LU glue layers for realnvp guides above 16 latents, and the
#: spline pair and final multiplier of realnvp guides of up to 16, came later and were
#: not measured at this budget; at its constant lr 1e-3 a multiplier of 1/8 would slow
#: the conditioners' last layers eightfold).
GUIDE_BUDGETS: dict[str, dict[str, Any]] = {
    "default": {
        "flow": "iaf",
        "flow_options": {},
        "steps": 1000,
        "num_particles": 8,
        "lr": 1e-2,
        "final_lr": 1e-3,
        "gradient": None,  # AutoFlow's default for the family and latent size
        "anneal": 0.2,
        "anneal_start": 0.5,
        "gradient_clip": 10.0,  # each gradient element, as Pyro's ClippedAdam
        "mixture_weights": "learned",
        # Two flows, 192 cells of the two-mode targets: all three moment bars in 153
        # against 138 when learned from step 0, mean KL level (-0.005 +- 0.006).
        "hold_weights_while_annealing": True,
    },
    "high": {
        "flow": "realnvp",
        "flow_options": {
            "num_layers": 8,
            "hidden_dims": (128, 128),
            "permutation": None,
            "coupling_function": "affine",
            "final_multiplier": 1.0,
        },
        "steps": 10_000,
        "num_particles": 64,
        "lr": 1e-3,
        "final_lr": 1e-3,
        "gradient": "path",
        "anneal": 0.0,
        "anneal_start": 0.1,
        "gradient_clip": math.inf,  # as measured
        # Two realnvp flows on the lopsided target's four axes, seed 0, 2000 of the
        # 10,000 steps: mean KL 0.056 learned against 0.124 equal (bars in 3 of 4 and 1).
        "mixture_weights": "learned",
        "hold_weights_while_annealing": True,  # no annealing here, so no effect
    },
}

#: Consecutive refused (non-finite) updates after which :func:`fit_guide` stops.
MAX_REFUSED_UPDATES = 20

#: The start of torch's warning when a learning-rate scheduler steps before any
#: optimizer update (as after a refused first update), which :func:`fit_guide` silences.
_SCHEDULER_FIRST_MESSAGE = re.escape("Detected call of `lr_scheduler.step()` before")


class _ScaleObserved(Messenger):
    """Multiplies the log-density of every observed site (data and ``pyro.factor``)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]


def temper_likelihood(model: Callable[..., Any], inverse_temperature: float) -> Callable[..., Any]:
    r"""``model`` with its likelihood raised to the power ``inverse_temperature`` (beta).

    .. math::
        p_\beta(\theta, y) = p(\theta)\, p(y \mid \theta)^{\beta}, \qquad 0 < \beta \le 1

    Every observed site, data and ``pyro.factor`` alike, has its log-density multiplied
    by beta; latent sites keep theirs, so the tempered posterior is proper whenever the
    prior is (tempering the prior too would not be: a half-Cauchy prior to the power
    0.1 cannot be normalized). At small beta the posterior is close to the prior, wide
    and with one mode; raising beta to 1 brings back ``model``'s posterior. A guide
    trained along that path (:func:`fit_guide`'s ``anneal``) spreads over the modes
    before they separate, instead of falling into the nearest.

    Arguments:
        model: a Pyro model.
        inverse_temperature: beta, in (0, 1].

    Returns:
        the tempered model, called with ``model``'s arguments (``model`` itself at
        beta = 1, so a schedule's later steps run the model unwrapped).

    Raises:
        ValueError: if ``inverse_temperature`` is not in (0, 1].

    Example:
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("y", dist.Normal(z, 1.0), obs=torch.tensor(2.0))
        >>> trace = pyro.poutine.trace(temper_likelihood(model, 0.5)).get_trace()
        >>> y, z = trace.nodes["y"], trace.nodes["z"]
        >>> y["scale"], z["scale"]
        (0.5, 1.0)
    """
    beta = _inverse_temperature("inverse_temperature", inverse_temperature)
    return model if beta == 1.0 else _ScaleObserved(beta)(model)


def _inverse_temperature(name: str, value: Any) -> float:
    """``value`` as a float if it is an inverse temperature in (0, 1], else a ``ValueError``."""
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


def _anneal_fraction(value: Any) -> float:
    """``value`` as a float if it is a fraction of the steps in [0, 1], else a ``ValueError``."""
    if isinstance(value, bool) or not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"anneal must be a fraction of the steps in [0, 1], got {value!r}")
    return float(value)


def annealed_inverse_temperature(step: int, steps: int, anneal: float, start: float) -> float:
    r"""The inverse temperature of step ``step`` of ``steps``: rising linearly from ``start``
    at step 0 to 1 at step ``anneal * steps``, and 1 from there on (1 throughout when
    ``anneal`` is 0).

    .. math::
        \beta_t = \min\Big(1,\ \text{start} + (1 - \text{start})
        \frac{t}{\text{anneal} \cdot \text{steps}}\Big)

    Raises:
        ValueError: if ``anneal`` is not in [0, 1] or ``start`` not in (0, 1].

    Example:
        >>> tuple(annealed_inverse_temperature(step, 10, 0.5, 0.1) for step in (0, 1, 5, 9))
        (0.1, 0.28, 1.0, 1.0)
    """
    anneal, start = _anneal_fraction(anneal), _inverse_temperature("start", start)
    annealing_steps = anneal * steps
    if step >= annealing_steps:
        return 1.0
    return start + (1.0 - start) * step / annealing_steps


def fit_guide(
    model: Callable[..., Any],
    *args: Any,
    budget: str = "default",
    flow: str | None = None,
    flow_options: dict[str, Any] | None = None,
    steps: int | None = None,
    num_particles: int | None = None,
    lr: float | None = None,
    final_lr: float | None = None,
    gradient: str | None = None,
    anneal: float | None = None,
    anneal_start: float | None = None,
    gradient_clip: float | None = None,
    hold_weights_while_annealing: bool | None = None,
    max_plate_nesting: int | None = None,
    losses: list[float] | None = None,
    **kwargs: Any,
) -> AutoFlow:
    r"""Train an :class:`AutoFlow` guide of ``model`` on the ELBO and return it.

    .. math::
        \max_\phi\ \mathbb E_{q_\phi(\theta)}[\log p(\theta, y) - \log q_\phi(\theta)]

    estimated with ``num_particles`` vectorized draws per step (``Trace_ELBO``), by
    Adam whose learning rate decays exponentially from ``lr`` to ``final_lr`` over
    ``steps``. For the first ``anneal * steps`` steps the likelihood is tempered,
    :math:`p(\theta)\, p(y \mid \theta)^{\beta}` (:func:`temper_likelihood`), with
    beta rising linearly from ``anneal_start`` to 1: the guide spreads over every mode
    of the posterior while it is wide and keeps them as they separate (Rezende and
    Mohamed, 2015, annealed the same way). ``budget`` picks the preset of
    :data:`GUIDE_BUDGETS`; every other argument given overrides that preset's entry. An
    update whose loss or gradient is not finite is refused (the parameters keep the
    values of the last good update, as in :func:`~pyro_nf.infer.fit`); after
    :data:`MAX_REFUSED_UPDATES` refusals in a row training stops with
    :class:`~pyro_nf.infer.NonFiniteLossError`, the guide holding its last good
    parameters (``error.guide``).

    The guide's parameters live in Pyro's param store (clear it first if a guide named
    ``AutoFlow`` was trained on another model). Draws use Pyro's global random state
    (``pyro.set_rng_seed`` makes a run reproducible).

    Arguments:
        model: a Pyro model with continuous latent sites.
        *args, **kwargs: the model's arguments.
        budget: ``"default"`` (AutoFlow's defaults, the suite's 1000 steps of 8
            particles, the first 200 annealed, gradients clamped at 10) or ``"high"``
            (real NVP with 8 coupling layers of ``(128, 128)``, 64 particles, the
            path-derivative gradient, 10,000 steps at a fixed lr 1e-3).
        flow, flow_options: the guide's family and builder options (with
            ``AutoFlow``'s own ``init_scale``, ``base``, ``init_loc_fn`` and
            ``components`` and ``mixture_weights``). ``flow_options={"components":
            2}`` anneals a mixture of two flows whose weights are learned
            (``mixture_weights`` from the preset, ``"learned"``, unless given; the
            loss is then :class:`~pyro_nf.infer.MixtureELBO`, ``Trace_ELBO``
            otherwise). On the posterior suite's two-mode targets (16 cells each) two
            iaf flows with learned weights took the mean KL from 0.132 (one flow) and
            0.057 (equal weights) to 0.031 where the modes' masses are equal, and from
            0.154 and 0.132 to 0.035 where they are 3/4 and 1/4, the best guide
            measured on both, at about 3 times one flow's time on 2 latents
            (``docs/benchmarks/posteriors-defaults.md``, "Learned mixture weights").
        steps, num_particles, lr, final_lr: the optimization.
        gradient: ``"total"`` or ``"path"`` (see :class:`AutoFlow`); with the
            ``"default"`` budget, ``AutoFlow``'s own default (``"path"`` for realnvp and
            maf above 16 latents, else ``"total"``).
        anneal: the fraction of ``steps`` spent on the tempered likelihood, in [0, 1]
            (0: none). The ``"default"`` budget anneals a fifth of the steps from beta
            0.5: over seeds 0-8 (iaf, 1000 steps) it tied training without annealing
            on the banana, the funnel and both schools (within 0.002 nats of KL or
            ELBO), took the two-mode target's mean KL from 0.299 to 0.154 over 24
            cells (seeds 0-5; one mode kept in 1 cell against 7) and gained 0.33 and
            0.18 nats on the logistic regression and radon (ahead at each of seeds
            0-5); from beta 0.1 instead it lost the funnel (KL +0.08). With
            ``flow="maf"`` it also won or tied on every target (seeds 0-2); with
            ``flow="realnvp"`` it gained 1.1 nats on radon and 0.06 of KL on the
            two-mode target and lost 0.011 and 0.032 nats of KL on the banana and the
            funnel, so ``anneal=0`` is the measured choice for a realnvp guide of a
            posterior known to have one mode (all measured before the gradient clamp).
            ``"high"`` does not anneal (not measured). ``anneal=0.5,
            anneal_start=0.1`` is the measured choice of the suite's plain SVI loop for
            a posterior with several modes: it halves every flow guide's mean KL there
            and loses 0.08 to 0.24 nats on the funnel (``docs/benchmarks/posteriors-defaults.md``,
            "Annealing the likelihood"). The losses of those steps are the tempered
            model's.
        anneal_start: the first step's inverse temperature beta, in (0, 1] (0.5 in
            the ``"default"`` budget, 0.1 in ``"high"``).
        gradient_clip: each gradient element is clamped to ``[-gradient_clip,
            gradient_clip]`` before the Adam update, as Pyro's ``ClippedAdam`` does
            (``inf``: no clamp). The ``"default"`` budget clamps at 10: against the
            same budget without it (seeds 0-2, bimodal 0-5) it won or tied on every
            target for iaf, maf and realnvp (within 0.01 nats where behind), gained
            0.16 and 0.60 nats on radon with maf and realnvp guides (ahead at each
            seed) and 0.05 to 0.07 on the centred schools, and took the two-mode
            target's mean KL from 0.154 to 0.119 (iaf; one mode in no cell of 24),
            0.246 to 0.214 (maf) and 0.309 to 0.224 (realnvp; one mode in 2 cells
            against 6). ``"high"`` does not clamp (as measured).
        hold_weights_while_annealing: for a guide with learned mixture weights, keep
            them at their start (1/K each) while the likelihood is tempered and learn
            them only from the first untempered step (their gradient is zeroed before
            Adam sees it; the flows train throughout). The tempered posterior's modes
            have other masses than the posterior's. On in both presets: with two flows
            on the posterior suite's two-mode targets (192 cells, iaf, maf and realnvp)
            it met all three moment bars in 153 cells against 138 with the weights
            learned from step 0, at a level mean KL
            (``docs/benchmarks/posteriors-defaults.md``, "Learned mixture weights").
        max_plate_nesting: the model's plate depth (guessed by Pyro when None).
        losses: a list that receives the loss (negative ELBO estimate) of every step.

    Returns:
        the trained guide.

    Raises:
        ValueError: for an unknown budget, a non-positive step count, particle count,
            learning rate or ``gradient_clip``, an ``anneal`` outside [0, 1] or
            ``anneal_start`` outside (0, 1], or a ``hold_weights_while_annealing`` that
            is not a bool.
        NonFiniteLossError: after a run of refused updates.

    References:
        Disentangling Capacity and Optimization for Flow-Based Variational Inference
        (Agrawal and Domke, 2024), arXiv:2412.08824. Sticking the Landing (Roeder et
        al., 2017), arXiv:1703.09194. Variational Inference with Normalizing Flows
        (Rezende and Mohamed, 2015), arXiv:1505.05770.

    Example:
        >>> def model():
        ...     pyro.sample("z", dist.Normal(torch.ones(3), 2.0).to_event(1))
        >>> pyro.clear_param_store()
        >>> history = []
        >>> guide = fit_guide(model, steps=20, losses=history,
        ...                   flow_options={"num_layers": 1, "hidden_dims": (8,)})
        >>> len(history)
        20
    """
    if budget not in GUIDE_BUDGETS:
        raise ValueError(f"budget must be one of {tuple(GUIDE_BUDGETS)}, got {budget!r}")
    preset = GUIDE_BUDGETS[budget]
    flow = preset["flow"] if flow is None else flow
    options = dict(preset["flow_options"] if flow_options is None else flow_options)
    steps = _positive(int, "steps", preset["steps"] if steps is None else steps)
    num_particles = _positive(
        int, "num_particles", preset["num_particles"] if num_particles is None else num_particles
    )
    lr = _positive(float, "lr", preset["lr"] if lr is None else lr)
    final_lr = _positive(float, "final_lr", preset["final_lr"] if final_lr is None else final_lr)
    options.setdefault("gradient", preset["gradient"] if gradient is None else gradient)
    components = options.get("components", 1)
    if isinstance(components, int) and not isinstance(components, bool) and components > 1:
        options.setdefault("mixture_weights", preset["mixture_weights"])
    anneal = _anneal_fraction(preset["anneal"] if anneal is None else anneal)
    anneal_start = _inverse_temperature(
        "anneal_start", preset["anneal_start"] if anneal_start is None else anneal_start
    )
    gradient_clip = _gradient_clip(
        preset["gradient_clip"] if gradient_clip is None else gradient_clip
    )
    if hold_weights_while_annealing is None:
        hold_weights_while_annealing = preset["hold_weights_while_annealing"]
    if not isinstance(hold_weights_while_annealing, bool):
        raise ValueError(
            "hold_weights_while_annealing must be True or False, got "
            f"{hold_weights_while_annealing!r}"
        )

    guide = AutoFlow(model, flow=flow, **options)
    guide(*args, **kwargs)  # builds the parameters
    elbo = elbo_for_guide(
        guide, num_particles, math.inf if max_plate_nesting is None else max_plate_nesting
    )
    parameters = [p for p in guide.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizer, (final_lr / lr) ** (1.0 / steps))
    holds_weights = hold_weights_while_annealing and guide.mixture_weights == "learned"
    backward_holding_weights = _backward_holding_weights(guide) if holds_weights else None
    refused = 0
    for step in range(steps):
        beta = annealed_inverse_temperature(step, steps, anneal, anneal_start)
        loss = elbo.differentiable_loss(temper_likelihood(model, beta), guide, *args, **kwargs)
        backward = backward_holding_weights if beta < 1.0 else None
        failure = optimization_step(loss, optimizer, backward=backward, gradient_clip=gradient_clip)
        if losses is not None:
            losses.append(float(loss.detach()))
        refused = refused + 1 if failure is not None else 0
        if refused >= MAX_REFUSED_UPDATES:
            error = NonFiniteLossError(
                f"{refused} updates in a row had a non-finite {failure} (last at step {step}); "
                "the guide holds the parameters of the last good update",
                epoch=0,
                step=step,
            )
            error.guide = guide
            raise error
        with warnings.catch_warnings():
            # The schedule follows the step count, refused updates included; after a
            # refused first update torch warns of a scheduler step before any update.
            warnings.filterwarnings("ignore", _SCHEDULER_FIRST_MESSAGE, UserWarning)
            decay.step()
    return guide


def _backward_holding_weights(guide: AutoFlow) -> Callable[[Tensor], None]:
    """Backpropagation that zeroes the gradient of the guide's learned mixture logits.
    From the first step on, Adam's moments of the logits then stay zero and its
    updates leave them where they are. A non-finite gradient is left as it is, so that
    :func:`~pyro_nf.infer.training.optimization_step` still refuses the update."""

    def backward(loss: Tensor) -> None:
        loss.backward()
        grad = guide.mixture_logits.grad
        if grad is not None and bool(torch.isfinite(grad).all()):
            grad.zero_()

    return backward


def _gradient_clip(value: Any) -> float:
    """``value`` as a float if it is positive (``inf``: no clamp), else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"gradient_clip must be positive (inf: no clamp), got {value!r}")
    return float(value)


def _positive(kind: type, name: str, value: Any) -> Any:
    """``value`` as ``kind`` if it is a positive finite number, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return kind(value)
