"""Density suite: pyro-nf's flows and their peers as density models at one budget.

Every model gets the same budget: about ``--params`` parameters (each model's hidden
width is chosen to come closest), ``--steps`` Adam steps at learning rate ``--lr``
with a cosine decay to 0, and minibatches of ``--batch`` fresh points per step (toys)
or of the training split (tabular data). The score is the held-out negative
log-likelihood, nats per point, with its standard error, and the training time.
Peers run in the same process, interleaved toy by toy: Pyro's spline autoregressive
flow and zuko's NSF, MAF and CNF.

The 2-D toys are pyro_nf.datasets' eight densities and two more defined here: the
swiss roll (FFJORD's recipe) and ``student_t``, two independent Student-t(3)
coordinates scaled to unit variance, whose tails reach well past ±10 and whose exact
NLL is known. Tabular rows: scikit-learn's bundled wine (13-d), breast cancer (30-d)
and digits (64-d, uniformly dequantized), standardized with the training split's
statistics; the model with the best validation NLL (checked every 100 steps) is scored.

Run::

    python benchmarks/density.py                      # the full suite (tens of minutes)
    python benchmarks/density.py --quick              # a smoke test in seconds
    python benchmarks/density.py --toys rings --models "pyro-nf spline coupling" "zuko NSF"
    python benchmarks/density.py --study splines      # the spline-option study
    python benchmarks/density.py --study cnf --toys rings --steps 300   # CNF settings, costs
    python benchmarks/density.py --figure docs/images/density_grid.png --output results.json
    python benchmarks/density.py --combine a.json b.json --figure grid.png   # merge runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import Tensor, nn

import pyro_nf
from pyro_nf.datasets import TOY_DENSITIES, toy_density, train_test_split

# ------------------------------------------------------------------------------ models


class DensityModel(nn.Module):
    """A trainable density: its parameters and ``log_prob(x)`` of shape ``x.shape[:-1]``.

    ``distribution`` (optional) returns the Pyro distribution of x, for the SVI path.
    ``penalty`` (optional) returns a per-point penalty of the last ``log_prob``'s batch,
    added to the loss of the same step (the CNF's kinetic and Jacobian regularizers).
    ``evaluations`` (optional) returns the ODE function evaluations made since its last
    call (forward solve and backward pass). ``on_mode(training)`` (optional) runs on
    ``train()`` / ``eval()``, e.g. to switch an ODE solver's tolerances.
    ``loss`` (optional) replaces the mean NLL of a minibatch as the training loss (flow
    matching); such a model takes ``step_factor`` times the budget's Adam steps at
    ``lr_factor`` times its learning rate, and trains by the direct path only.
    """

    def __init__(
        self,
        module: nn.Module,
        log_prob: Callable[[Tensor], Tensor],
        distribution: Callable[[], dist.Distribution] | None = None,
        penalty: Callable[[], Tensor] | None = None,
        evaluations: Callable[[], int] | None = None,
        on_mode: Callable[[bool], None] | None = None,
        loss: Callable[[Tensor], Tensor] | None = None,
        step_factor: int = 1,
        lr_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.module = module
        self._log_prob = log_prob
        self.distribution = distribution
        self.penalty = penalty
        self.evaluations = evaluations
        self.on_mode = on_mode
        self.loss = loss
        self.step_factor = step_factor
        self.lr_factor = lr_factor

    def log_prob(self, x: Tensor) -> Tensor:
        return self._log_prob(x)

    def train(self, mode: bool = True) -> DensityModel:
        super().train(mode)
        if self.on_mode is not None:
            self.on_mode(mode)
        return self


def pyro_nf_model(flow: pyro_nf.Flow) -> DensityModel:
    return DensityModel(flow, flow.log_prob, flow)


def zuko_model(flow: nn.Module) -> DensityModel:
    return DensityModel(flow, lambda x: flow().log_prob(x))


def pyro_spline_autoregressive(dim: int, width: int, num_layers: int = 3) -> DensityModel:
    """Pyro's ``spline_autoregressive`` (8 bins on [-3, 3], identity tails), reversed between."""
    layers: list = []
    for i in range(num_layers):
        layers.append(T.spline_autoregressive(dim, hidden_dims=[width, width]))
        if i < num_layers - 1 and dim > 1:
            layers.append(T.Permute(torch.arange(dim - 1, -1, -1)))
    modules = nn.ModuleList([layer for layer in layers if isinstance(layer, nn.Module)])
    holder = nn.Module()
    holder.layers = modules
    holder.register_buffer("loc", torch.zeros(dim))
    holder.register_buffer("scale", torch.ones(dim))

    def distribution() -> dist.TransformedDistribution:
        base = dist.Normal(holder.loc, holder.scale).to_event(1)
        return dist.TransformedDistribution(base, layers)

    return DensityModel(holder, lambda x: distribution().log_prob(x), distribution)


@dataclass(frozen=True)
class CNFOptions:
    """A CNF density model's settings: its dynamics, regularizers and solver tolerances.

    ``depth`` hidden layers of equal width (set by the budget) in each block's
    concat-squash dynamics; ``kinetic`` and ``jacobian`` weigh the RNODE regularizers
    (the kinetic energy, the integral of ``|f|^2`` along the path, and the integral of
    the squared Frobenius norm of ``df/dz``; per point, added to the NLL); the solver
    runs at ``rtol = atol = train_tol`` in training and
    at ``eval_tol`` when scoring (``eval()``). ``init`` is the dynamics' hidden-layer
    initialisation (:class:`~pyro_nf.nn.ODEDynamics`: ``"preserve"``, the default, or
    ``"torch"``, PyTorch's, the default before; the name then ends in ``torch-init``).
    ``state_scale``: fields ``s(z, t) * z + m(z, t)`` (the name ends in ``state-scale``).
    ``adjoint=False``: gradients by backpropagation through the solver's steps instead of
    the adjoint solve (the name ends in ``backprop``).
    """

    depth: int = 3
    blocks: int = 1
    kinetic: float = 0.0
    jacobian: float = 0.0
    train_tol: float = 1e-3
    eval_tol: float = 1e-5
    activation: str = "tanh"
    time: float = 1.0
    init_scale: float = 1e-2
    actnorm: bool = False
    init: str = "preserve"
    state_scale: bool = False
    adjoint: bool = True

    def name(self) -> str:
        text = f"cnf {self.depth}x{self.activation}"
        if self.blocks > 1:
            text += f" {self.blocks} blocks"
        if self.kinetic or self.jacobian:
            text += f" reg {self.kinetic:g}/{self.jacobian:g}"
        text += f" tol {self.train_tol:g}"
        text += f" T={self.time:g}" if self.time != 1.0 else ""
        text += f" init {self.init_scale:g}" if self.init_scale != 1e-2 else ""
        text += " torch-init" if self.init == "torch" else ""
        text += " state-scale" if self.state_scale else ""
        text += " backprop" if not self.adjoint else ""
        return text + (" actnorm" if self.actnorm else "")


def pyro_nf_cnf(options: CNFOptions) -> Callable[[int, int], DensityModel]:
    """pyro-nf's CNF with ``options``: regularized, counted, tolerances switched.

    The layers of ``pyro_nf.cnf()`` (one :class:`~pyro_nf.transforms.ContinuousFlow`
    per block), built here so that the dynamics' ``final_init_scale`` can be set.
    """
    from pyro_nf.nn import ODEDynamics
    from pyro_nf.transforms import ActNorm, ContinuousFlow, collect_regularization

    def make(d: int, w: int) -> DensityModel:
        regularize = bool(options.kinetic or options.jacobian)
        blocks = [
            ContinuousFlow(
                d,
                ODEDynamics(
                    d,
                    (w,) * options.depth,
                    activation=options.activation,
                    final_init_scale=options.init_scale,
                    init=options.init,
                    state_scale=options.state_scale,
                ),
                time=options.time,
                regularize=regularize,
                adjoint=options.adjoint,
                rtol=options.train_tol,
                atol=options.train_tol,
            )
            for _ in range(options.blocks)
        ]
        layers = blocks
        if options.actnorm:  # as cnf(actnorm=True): an ActNorm before every block
            layers = [layer for block in blocks for layer in (ActNorm(d), block)]
        flow = pyro_nf.Flow(layers, d)

        def penalty() -> Tensor:
            terms = collect_regularization(flow)
            return (
                options.kinetic * terms["kinetic_energy"]
                + options.jacobian * terms["jacobian_frobenius"]
            )

        def evaluations() -> int:
            return sum(block.ode.nfe_forward + block.ode.nfe_backward for block in blocks)

        def on_mode(training: bool) -> None:
            tolerance = options.train_tol if training else options.eval_tol
            for layer in blocks:
                layer.ode.rtol = layer.ode.atol = tolerance

        return DensityModel(
            flow, flow.log_prob, flow, penalty if regularize else None, evaluations, on_mode
        )

    return make


@dataclass(frozen=True)
class FlowMatchingOptions:
    """A CNF density model trained by flow matching (:func:`pyro_nf.infer.flow_matching_loss`).

    The dynamics of ``CNFOptions(depth=depth)`` (scored at ``rtol = atol = 1e-5``),
    trained for ``step_factor`` times the budget's steps at ``lr_factor`` times its
    learning rate (cosine decay, batch and fresh minibatches as every model). One
    flow-matching step is one evaluation of the field and its backward pass, tens of
    times cheaper than a likelihood step through the solver, so the suite's CPU time
    buys tens of times more steps; the rows show that time beside the NLL.
    """

    depth: int = 3
    step_factor: int = 50
    lr_factor: float = 10.0

    def name(self) -> str:
        return (
            f"cnf {self.depth}xtanh flow matching "
            f"{self.step_factor:g}x steps {self.lr_factor:g}x lr"
        )


def pyro_nf_cnf_flow_matching(options: FlowMatchingOptions) -> Callable[[int, int], DensityModel]:
    """pyro-nf's CNF with ``options``, trained by flow matching and scored by its solve."""
    from pyro_nf.infer import flow_matching_loss

    make_cnf = pyro_nf_cnf(CNFOptions(depth=options.depth))

    def make(d: int, w: int) -> DensityModel:
        model = make_cnf(d, w)
        flow = model.module
        field_passes = [0]

        def loss(x: Tensor) -> Tensor:
            field_passes[0] += 1  # one (batched) field evaluation per step
            return flow_matching_loss(flow, x)

        def evaluations() -> int:
            value, field_passes[0] = field_passes[0], 0
            return value + model.evaluations()

        return DensityModel(
            flow,
            flow.log_prob,
            flow,
            None,
            evaluations,
            model.on_mode,
            loss,
            options.step_factor,
            options.lr_factor,
        )

    return make


def zuko_cnf(
    depth: int = 2, train_tol: float | None = None, eval_tol: float | None = None
) -> Callable[[int, int], DensityModel]:
    """zuko's ``CNF`` (exact trace; its defaults: ELU, atol 1e-6, rtol 1e-5), counted.

    With ``train_tol`` / ``eval_tol`` its ``atol = rtol`` are set in training / scoring.
    """

    def make(d: int, w: int) -> DensityModel:
        flow = _zuko().CNF(d, hidden_features=(w,) * depth)
        transform = next(m for m in flow.modules() if hasattr(m, "exact") and hasattr(m, "f"))
        count = [0]
        function = transform.f

        def counted(*args: Tensor, **kwargs: Tensor) -> Tensor:
            count[0] += 1
            return function(*args, **kwargs)

        transform.f = counted  # FFJTransform.forward reads self.f at every call

        def evaluations() -> int:
            value, count[0] = count[0], 0
            return value

        def on_mode(training: bool) -> None:
            tolerance = train_tol if training else eval_tol
            if tolerance is not None:
                transform.atol = transform.rtol = tolerance

        return DensityModel(flow, lambda x: flow().log_prob(x), None, None, evaluations, on_mode)

    return make


def spline_options(**overrides: object) -> dict:
    """The spline coupling function's keyword arguments for the suite's spline models."""
    return dict(overrides)


#: name -> ``(dim, width) -> DensityModel``: each model at its library's defaults but
#: for the hidden width (two hidden layers of ``width``), which sets the budget.
MODELS: dict[str, Callable[[int, int], DensityModel]] = {
    "pyro-nf realnvp": lambda d, w: pyro_nf_model(pyro_nf.realnvp(d, hidden_dims=(w, w))),
    "pyro-nf spline coupling": lambda d, w: pyro_nf_model(
        pyro_nf.realnvp(d, hidden_dims=(w, w), coupling_function="spline")
    ),
    # The same flow on independent Student-t coordinates with learned degrees of freedom.
    "pyro-nf spline coupling t": lambda d, w: pyro_nf_model(
        pyro_nf.realnvp(d, hidden_dims=(w, w), coupling_function="spline", base="student_t")
    ),
    "pyro-nf maf": lambda d, w: pyro_nf_model(pyro_nf.maf(d, hidden_dims=(w, w))),
    "pyro-nf spline maf": lambda d, w: pyro_nf_model(
        pyro_nf.maf(d, hidden_dims=(w, w), coupling_function="spline")
    ),
    "pyro-nf cnf": pyro_nf_cnf(CNFOptions(depth=2, train_tol=1e-5)),  # cnf()'s defaults
    # The density settings of --study cnf: 3 hidden layers, trained at 1e-3, scored at 1e-5.
    "pyro-nf cnf (density)": pyro_nf_cnf(CNFOptions()),
    # The same CNF trained by flow matching: 50x the steps (about the likelihood CNF's
    # CPU time) at 10x the learning rate.
    "pyro-nf cnf (flow matching)": pyro_nf_cnf_flow_matching(FlowMatchingOptions()),
    "pyro spline AR": pyro_spline_autoregressive,
    "zuko NSF": lambda d, w: zuko_model(_zuko().NSF(d, hidden_features=(w, w))),
    "zuko MAF": lambda d, w: zuko_model(_zuko().MAF(d, hidden_features=(w, w))),
    "zuko CNF": zuko_cnf(),
}

#: The models of the tabular rows (the CNFs' exact trace is too slow at 64-d here).
TABULAR_MODELS = (
    "pyro-nf realnvp",
    "pyro-nf spline coupling",
    "pyro-nf spline coupling t",
    "pyro-nf maf",
    "pyro-nf spline maf",
    "zuko NSF",
    "zuko MAF",
)


def _zuko():
    import zuko.flows

    return zuko.flows


def spline_study_models() -> dict[str, Callable[[int, int], DensityModel]]:
    """Spline coupling flows over bound, tails, bins and ActNorm, for choosing defaults."""
    variants = [
        (8, 3.0, "identity", False),
        (8, 3.0, "linear", False),
        (8, 5.0, "identity", False),
        (8, 5.0, "linear", False),
        (8, 8.0, "identity", False),
        (8, 8.0, "linear", False),
        (16, 5.0, "linear", False),
        (16, 8.0, "linear", False),
        (16, 4.0, "linear", False),
        (8, 3.0, "linear", True),
        (8, 5.0, "linear", True),
        (16, 3.0, "linear", True),
        (16, 5.0, "linear", True),
    ]
    models = {}
    for bins, bound, tails, actnorm in variants:
        options = {"num_bins": bins, "bound": bound, "tails": tails}
        name = f"K={bins} B={bound:g} {tails}" + (" actnorm" if actnorm else "")
        models[name] = _spline_coupling(options, actnorm)
    return models


#: The CNF study's settings (``--study cnf``): depth and activation of the dynamics,
#: blocks, the RNODE regularizers' weights and the training tolerance.
CNF_STUDY = (
    CNFOptions(depth=2, train_tol=1e-5),  # pyro_nf.cnf()'s defaults
    CNFOptions(depth=2),
    CNFOptions(depth=3),
    CNFOptions(depth=4),
    CNFOptions(depth=3, activation="softplus"),
    CNFOptions(depth=3, kinetic=0.01, jacobian=0.01),
    CNFOptions(depth=3, kinetic=0.1, jacobian=0.1),
    CNFOptions(depth=3, train_tol=1e-4),
    CNFOptions(depth=3, train_tol=1e-2),
    CNFOptions(depth=3, blocks=2),
    CNFOptions(depth=3, actnorm=True),
    CNFOptions(depth=3, init_scale=1.0),
    CNFOptions(depth=3, time=3.0),
    CNFOptions(depth=3, actnorm=True, init_scale=1.0),
    CNFOptions(depth=3, actnorm=True, kinetic=0.01, jacobian=0.01),
    CNFOptions(depth=3, init="torch"),  # the dynamics' init before init="preserve"
    CNFOptions(depth=3, state_scale=True),
    CNFOptions(depth=3, state_scale=True, time=3.0),
    CNFOptions(depth=3, state_scale=True, time=5.0),
    CNFOptions(depth=3, state_scale=True, time=10.0),
    CNFOptions(depth=3, adjoint=False),
    CNFOptions(depth=3, adjoint=False, state_scale=True),
)


#: The flow-matching settings of ``--study cnf``: steps and learning rate, as multiples
#: of the budget's.
FLOW_MATCHING_STUDY = (
    FlowMatchingOptions(lr_factor=1.0),
    FlowMatchingOptions(lr_factor=3.0),
    FlowMatchingOptions(lr_factor=10.0),
    FlowMatchingOptions(lr_factor=30.0),
    FlowMatchingOptions(step_factor=20),
    FlowMatchingOptions(step_factor=100),
    FlowMatchingOptions(depth=4),
)


def cnf_study_models() -> dict[str, Callable[[int, int], DensityModel]]:
    """pyro-nf's CNF over :data:`CNF_STUDY` (likelihood) and :data:`FLOW_MATCHING_STUDY`,
    and zuko's CNF at its defaults and at 1e-3."""
    models = {options.name(): pyro_nf_cnf(options) for options in CNF_STUDY}
    models |= {o.name(): pyro_nf_cnf_flow_matching(o) for o in FLOW_MATCHING_STUDY}
    models["zuko CNF"] = MODELS["zuko CNF"]
    models["zuko CNF 3 layers tol 0.001"] = zuko_cnf(3, 1e-3, 1e-5)
    return models


def _spline_coupling(options: dict, actnorm: bool = False) -> Callable[[int, int], DensityModel]:
    def make(d: int, w: int) -> DensityModel:
        flow = pyro_nf.realnvp(
            d,
            hidden_dims=(w, w),
            coupling_function="spline",
            coupling_kwargs=options,
            actnorm=actnorm,
        )
        return pyro_nf_model(flow)

    return make


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def width_for_budget(make: Callable[[int, int], DensityModel], dim: int, budget: int) -> int:
    """The hidden width whose model has the parameter count closest to ``budget``."""
    low, high = 1, 1024
    while high - low > 1:  # the count grows with the width: bisect for the crossing
        middle = (low + high) // 2
        if count_parameters(make(dim, middle)) < budget:
            low = middle
        else:
            high = middle
    counts = {w: count_parameters(make(dim, w)) for w in (low, high)}
    return min(counts, key=lambda w: abs(counts[w] - budget))


# -------------------------------------------------------------------------------- data


def swissroll(num_samples: int, seed: int = 0) -> Tensor:
    """FFJORD's swiss roll: sklearn's roll (noise 1) in the (x, z) plane, divided by 5."""
    from sklearn.datasets import make_swiss_roll

    points = make_swiss_roll(num_samples, noise=1.0, random_state=seed)[0][:, [0, 2]] / 5
    return torch.as_tensor(points, dtype=torch.get_default_dtype())


STUDENT_DF = 3.0


def student_t(num_samples: int, seed: int = 0) -> Tensor:
    """Two independent Student-t(3) coordinates at unit variance: data well past ±10."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(num_samples, 2, generator=generator, dtype=torch.float64)
    # A chi-square with an integer number of degrees of freedom: a sum of squared normals.
    squares = torch.randn(num_samples, 2, int(STUDENT_DF), generator=generator, dtype=torch.float64)
    chi2 = squares.pow(2).sum(-1)
    points = normal / torch.sqrt(chi2 / STUDENT_DF) / math.sqrt(STUDENT_DF / (STUDENT_DF - 2))
    return points.to(torch.get_default_dtype())


def student_t_log_prob(points: Tensor) -> Tensor:
    """The exact log-density of :func:`student_t`'s distribution at ``points`` ``(N, 2)``."""
    scale = 1 / math.sqrt(STUDENT_DF / (STUDENT_DF - 2))
    return dist.StudentT(STUDENT_DF, 0.0, scale).log_prob(points).sum(-1)


def student_t_nll() -> float:
    """The exact NLL (nats per point) of :func:`student_t`'s density."""
    # E[-log p] by a large fixed-seed Monte Carlo sum (the closed form needs digamma terms).
    return float(-student_t_log_prob(student_t(400_000, seed=123)).mean())


def toy_sampler(name: str) -> Callable[[int, int], Tensor]:
    """``(num_samples, seed) -> (num_samples, 2)`` for a suite toy."""
    if name == "swissroll":
        return swissroll
    if name == "student_t":
        return student_t
    return lambda n, seed: toy_density(name, n, seed=seed)


TOYS = (*TOY_DENSITIES, "swissroll", "student_t")


def tabular(name: str, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Standardized ``(train, validation, test)`` splits of a scikit-learn bundled set."""
    from sklearn import datasets

    loaders = {
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }
    data = torch.as_tensor(loaders[name]().data, dtype=torch.float64)
    if name == "digits":  # integer pixels 0..16: uniform dequantization to [0, 17)
        generator = torch.Generator().manual_seed(seed)
        data = data + torch.rand(data.shape, generator=generator, dtype=torch.float64)
    train, test = train_test_split(data, test_fraction=0.2, seed=seed)
    train, validation = train_test_split(train, test_fraction=0.1, seed=seed + 1)
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    dtype = torch.get_default_dtype()
    return tuple(((part - mean) / std).to(dtype) for part in (train, validation, test))


TABULAR = ("wine", "breast_cancer", "digits")

# ---------------------------------------------------------------------------- training


@dataclass
class Budget:
    params: int = 12_000
    steps: int = 1000
    batch: int = 256
    lr: float = 1e-3
    test_points: int = 20_000


def nll_and_error(model: DensityModel, x: Tensor, chunk: int = 5000) -> tuple[float, float]:
    """Mean NLL over ``x`` and its standard error (nats per point)."""
    with torch.no_grad():
        log_prob = torch.cat([model.log_prob(part) for part in x.split(chunk)])
    nll = -log_prob.double()
    if not bool(torch.isfinite(nll).all()):
        return math.nan, math.nan
    return float(nll.mean()), float(nll.std() / math.sqrt(nll.numel()))


def direct_step(model: DensityModel, budget: Budget) -> Callable[[Tensor], float]:
    """One Adam step on the mean NLL of a minibatch (or the model's own ``loss``), the
    learning rate decaying by cosine."""
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, budget.steps, eta_min=0.0)

    def step(x: Tensor) -> float:
        loss = -model.log_prob(x).mean() if model.loss is None else model.loss(x)
        if model.penalty is not None:
            loss = loss + model.penalty().mean()
        if torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        return float(loss.detach())

    return step


def svi_step(model: DensityModel, budget: Budget, data_size: int) -> Callable[[Tensor], float]:
    """One SVI step on ``pyro.sample("x", flow(), obs=x)`` under a subsampled plate.

    The plate has ``data_size`` points and the minibatch is its subsample, so the ELBO
    is ``data_size`` times the minibatch's mean log-likelihood (there are no latent
    variables: the guide is empty). Adam is invariant to that scale, so with the same
    minibatches this path takes the same steps as :func:`direct_step`.
    """
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    if model.distribution is None or model.loss is not None:
        raise ValueError(
            "this model has no Pyro distribution or does not train by likelihood: "
            "train it with --trainer direct"
        )
    pyro.clear_param_store()

    def pyro_model(x: Tensor) -> None:
        pyro.module("density", model.module)
        with pyro.plate("data", data_size, subsample=torch.arange(x.shape[0])):
            distribution = model.distribution()
            if model.penalty is not None:
                # Trace_ELBO scores the observed site after the model has run, but the
                # regularizers come from the solve: run it here (the site's score then
                # reads the transform's cache of this pair, so it is one solve). Per
                # point, scaled by the plate like the log-likelihood.
                distribution.log_prob(x)
                pyro.factor("regularization", -model.penalty())
            pyro.sample("x", distribution, obs=x)

    def guide(x: Tensor) -> None:
        pass

    optimizer = pyro.optim.CosineAnnealingLR(
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": budget.lr},
            "T_max": budget.steps,
            "eta_min": 0.0,
        }
    )
    svi = SVI(pyro_model, guide, optimizer, Trace_ELBO())

    def step(x: Tensor) -> float:
        loss = svi.step(x) / data_size
        optimizer.step()  # the learning-rate schedule
        return loss

    return step


def train(
    model: DensityModel,
    next_batch: Callable[[int], Tensor],
    budget: Budget,
    validation: Tensor | None = None,
    trainer: str = "direct",
    data_size: int | None = None,
    evaluations: list[int] | None = None,
) -> tuple[float, bool]:
    """Train for ``budget.steps``; returns (seconds, finished without a non-finite loss).

    The seconds are the process's CPU time (``time.process_time``): on a shared
    machine whose other jobs pause or slow this one, wall-clock time would carry
    their load; with one torch thread, CPU time is the training's own cost.

    With ``evaluations`` (a list) and a model that counts its ODE function evaluations,
    the count of every step (forward solve and backward pass) is appended to it.

    ``trainer`` is ``"direct"`` (:func:`direct_step`) or ``"svi"`` (:func:`svi_step`
    over a plate of ``data_size`` points). With ``validation`` data, the parameters
    with the best validation NLL (checked every 100 steps and at the end) are
    restored at the end. A model with its own ``step_factor`` and ``lr_factor`` (flow
    matching) trains for that many times the budget's steps at that many times its rate.
    """
    budget = dataclasses.replace(
        budget, steps=budget.steps * model.step_factor, lr=budget.lr * model.lr_factor
    )
    if trainer == "svi":
        step = svi_step(model, budget, data_size or budget.steps * budget.batch)
    else:
        step = direct_step(model, budget)
    best, best_state = math.inf, None
    start = time.process_time()
    finite = True
    model.train()
    for index in range(budget.steps):
        if not math.isfinite(step(next_batch(index))):
            finite = False
            break
        if evaluations is not None and model.evaluations is not None:
            evaluations.append(model.evaluations())
        last = index == budget.steps - 1
        if validation is not None and (index % 100 == 99 or last):
            score = nll_and_error(model, validation)[0]
            if score < best:
                best, best_state = score, copy.deepcopy(model.state_dict())
    seconds = time.process_time() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return seconds, finite


def density_grid(model: DensityModel, extent: float, size: int) -> Tensor:
    """``log p`` on a ``size x size`` grid over ``[-extent, extent]^2`` (rows: y, cols: x)."""
    axis = torch.linspace(-extent, extent, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
    with torch.no_grad():
        log_prob = torch.cat([model.log_prob(part) for part in points.split(10_000)])
    return log_prob.reshape(size, size)


def run_toy(
    toy: str,
    models: dict[str, Callable[[int, int], DensityModel]],
    budget: Budget,
    grid: dict | None,
    grid_size: int,
    seed: int,
    trainer: str = "direct",
) -> list[dict]:
    sample = toy_sampler(toy)
    test = sample(budget.test_points, 10**6 + seed)
    rows = []
    for name, make in models.items():
        torch.manual_seed(seed)
        width = width_for_budget(make, 2, budget.params)
        torch.manual_seed(seed)
        model = make(2, width)
        counts: list[int] = []
        seconds, finite = train(
            model,
            lambda step: sample(budget.batch, seed * 10**5 + step),
            budget,
            trainer=trainer,
            evaluations=counts,
        )
        rows.append(scored_row(toy, name, model, test, seconds, width, finite, counts))
        if grid is not None:
            extent = 8.0 if toy == "student_t" else 5.0
            grid[(toy, name)] = density_grid(model, extent, grid_size)
    return rows


def run_tabular(
    name: str,
    models: list[str],
    budget: Budget,
    seed: int,
    test_limit: int | None,
    trainer: str = "direct",
) -> list[dict]:
    train_data, validation, test = tabular(name, seed)
    if test_limit:
        test = test[:test_limit]
    dim = train_data.shape[1]
    rows = []
    for model_name in models:
        make = MODELS[model_name]
        torch.manual_seed(seed)
        width = width_for_budget(make, dim, budget.params)
        torch.manual_seed(seed)
        model = make(dim, width)
        generator = torch.Generator().manual_seed(seed)

        def next_batch(step: int, generator: torch.Generator = generator) -> Tensor:
            index = torch.randint(train_data.shape[0], (budget.batch,), generator=generator)
            return train_data[index]

        counts: list[int] = []
        seconds, finite = train(
            model, next_batch, budget, validation, trainer, train_data.shape[0], counts
        )
        data = f"{name} ({dim}-d)"
        rows.append(scored_row(data, model_name, model, test, seconds, width, finite, counts))
    return rows


# ----------------------------------------------------------------------------- reports


def scored_row(
    data: str,
    model_name: str,
    model: DensityModel,
    test: Tensor,
    seconds: float,
    width: int,
    finite: bool,
    evaluations: list[int] | None = None,
) -> dict:
    """One result row: the held-out NLL and its standard error, printed as it is made.

    For a model that counts ODE function evaluations the row also has ``nfe_train``,
    the mean count per training step (forward solve and backward pass, from
    ``evaluations``), and ``nfe_eval``, the count of one scoring solve of up to 5000
    test points (at the scoring tolerance).
    """
    nll, error = nll_and_error(model, test)
    row = {
        "data": data,
        "model": model_name,
        "nll": nll,
        "se": error,
        "seconds": seconds,
        "params": count_parameters(model),
        "width": width,
        "finite": finite,
    }
    if model.evaluations is not None:
        row["nfe_train"] = sum(evaluations) / len(evaluations) if evaluations else math.nan
        model.evaluations()  # start the count afresh
        with torch.no_grad():
            model.log_prob(test[:5000])
        row["nfe_eval"] = model.evaluations()
    print(format_row(row), flush=True)
    return row


def format_row(row: dict) -> str:
    flag = "" if row["finite"] else "  (stopped: non-finite loss)"
    if "nfe_train" in row:
        flag = f"  NFE {row['nfe_train']:.0f}/step, {row['nfe_eval']} to score" + flag
    return (
        f"{row['data']:<22} {row['model']:<40} NLL {row['nll']:8.3f} ± {row['se']:.3f}  "
        f"{row['seconds']:7.1f} s  {row['params']:6d} params (width {row['width']}){flag}"
    )


def _order(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Data sets and models in the suite's order (toys, then tabular; MODELS' order)."""
    known_data = [*TOYS, *TABULAR]
    known_models = list(MODELS)

    def data_rank(data: str) -> int:
        name = data.split(" (")[0]
        return known_data.index(name) if name in known_data else len(known_data)

    def model_rank(model: str) -> int:
        return known_models.index(model) if model in known_models else len(known_models)

    datasets = sorted(dict.fromkeys(row["data"] for row in rows), key=data_rank)
    models = sorted(dict.fromkeys(row["model"] for row in rows), key=model_rank)
    return datasets, models


def markdown_table(rows: list[dict]) -> str:
    """Data sets as rows, models as columns: ``NLL ± se`` (best in bold), then seconds.

    When pyro-nf models (names starting with ``pyro-nf``) and peers are both present,
    a last column gives pyro-nf's best NLL minus the best peer's (negative: pyro-nf
    ahead).
    """
    datasets, models = _order(rows)
    by_key = {(row["data"], row["model"]): row for row in rows}
    ours = [m for m in models if m.startswith("pyro-nf")]
    peers = [m for m in models if not m.startswith("pyro-nf")]
    margin = bool(ours and peers)
    header = "| data | " + " | ".join(models) + " |" + (" pyro-nf − best peer |" if margin else "")
    lines = [header, "|---|" + "---|" * (len(models) + margin)]

    def best_of(data: str, names: list[str]) -> float:
        values = [by_key[(data, m)]["nll"] for m in names if (data, m) in by_key]
        return min((v for v in values if not math.isnan(v)), default=math.nan)

    for data in datasets:
        best = best_of(data, models)
        cells = []
        for m in models:
            row = by_key.get((data, m))
            if row is None:
                cells.append("")
                continue
            text = f"{row['nll']:.3f} ± {row['se']:.3f}"
            cells.append(f"**{text}**" if row["nll"] == best else text)
        if margin:
            difference = best_of(data, ours) - best_of(data, peers)
            cells.append("" if math.isnan(difference) else f"{difference:+.3f}")
        lines.append(f"| {data} | " + " | ".join(cells) + " |")
    seconds = [
        f"{sum(by_key[(d, m)]['seconds'] for d in datasets if (d, m) in by_key):.0f}"
        for m in models
    ]
    lines.append(
        "| training time (s, sum) | " + " | ".join(seconds) + " |" + (" |" if margin else "")
    )
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    """The rows of models that count ODE evaluations: NLL beside its cost, one line each.

    Columns: data, model, NLL ± se, training CPU seconds, mean function evaluations
    per training step (forward solve and backward pass) and of one scoring solve.
    Empty when no row counts evaluations.
    """
    counted = [row for row in rows if "nfe_train" in row]
    if not counted:
        return ""
    lines = [
        "| data | model | NLL | training CPU s | NFE per training step | NFE to score |",
        "|---|---|---|---|---|---|",
    ]
    for row in counted:
        lines.append(
            f"| {row['data']} | {row['model']} | {row['nll']:.3f} ± {row['se']:.3f} | "
            f"{row['seconds']:.0f} | {row['nfe_train']:.0f} | {row['nfe_eval']} |"
        )
    return "\n".join(lines)


def plot_grid(grid: dict, toys: list[str], models: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(toys), len(models), figsize=(1.6 * len(models), 1.6 * len(toys)), squeeze=False
    )
    for i, toy in enumerate(toys):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(
                    model.replace("pyro-nf ", "").replace(" coupling", "\ncoupling"), fontsize=7
                )
            if j == 0:
                ax.set_ylabel(toy, fontsize=7)
            log_prob = grid.get((toy, model))
            if log_prob is None:
                continue
            log_prob = torch.nan_to_num(log_prob.double(), nan=-math.inf)
            if toy == "student_t":
                # Heavy tails are invisible on a linear scale: show log p over 12 nats.
                density = log_prob.clamp_min(log_prob.max() - 12)
                bottom, top = float(density.min()), float(density.max())
            else:
                density = torch.exp(log_prob)
                # A robust colour scale: the 99.5th percentile, so one spike does not
                # hide the rest.
                bottom, top = 0.0, max(float(torch.quantile(density.reshape(-1), 0.995)), 1e-12)
            extent = 8.0 if toy == "student_t" else 5.0
            ax.imshow(
                density.numpy(),
                origin="lower",
                extent=(-extent, extent, -extent, extent),
                vmin=bottom,
                vmax=top,
                cmap="viridis",
            )
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test")
    parser.add_argument("--toys", nargs="*", default=None, help=f"toys (default: all of {TOYS})")
    parser.add_argument("--models", nargs="*", default=None, help="models (default: all)")
    parser.add_argument("--tabular", nargs="*", default=None, help=f"tabular sets of {TABULAR}")
    parser.add_argument("--study", choices=["splines", "cnf"], default=None, help="a study")
    parser.add_argument("--params", type=int, default=12_000, help="parameters per model")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-points", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--trainer",
        choices=["direct", "svi"],
        default="direct",
        help="Adam on the mean NLL, or SVI on pyro.sample(obs=...) under a subsampled plate",
    )
    parser.add_argument("--figure", default=None, help="write the density grid figure here")
    parser.add_argument(
        "--output", default=None, help="write the rows as JSON here (and the grids beside it)"
    )
    parser.add_argument(
        "--combine", nargs="+", default=None, help="merge earlier --output files, train nothing"
    )
    return parser.parse_args(argv)


def combine(paths: list[str], figure: str | None) -> dict:
    """Merge the outputs of earlier runs (``--output``) into one table and figure."""
    rows: list[dict] = []
    grid: dict = {}
    for path in paths:
        with open(path) as file:
            rows += json.load(file)["rows"]
        try:
            grid.update(torch.load(grid_path(path)))
        except FileNotFoundError:
            pass
    table = markdown_table(rows)
    print(table)
    costs = cost_table(rows)
    if costs:
        print()
        print(costs)
    if figure and grid:
        toys = [toy for toy in TOYS if any(key[0] == toy for key in grid)]
        models = list(dict.fromkeys(key[1] for key in grid))
        plot_grid(grid, toys, models, figure)
    return {"rows": rows, "table": table}


def grid_path(output: str) -> str:
    return output + ".grids.pt"


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.combine:
        return combine(args.combine, args.figure)
    torch.set_num_threads(args.threads)
    budget = Budget(args.params, args.steps, args.batch, args.lr, args.test_points)
    toys = list(TOYS) if args.toys is None else args.toys
    tabular_sets = list(TABULAR) if args.tabular is None else args.tabular
    if args.quick:
        budget = Budget(params=2000, steps=5, batch=64, lr=args.lr, test_points=200)
        toys = ["two_moons"] if args.toys is None else args.toys
        tabular_sets = ["wine"] if args.tabular is None else args.tabular
    studies = {"splines": spline_study_models, "cnf": cnf_study_models}
    catalogue = studies[args.study]() if args.study else MODELS
    names = list(catalogue) if args.models is None else args.models
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        raise ValueError(f"unknown models {unknown}; expected some of {list(catalogue)}")
    unknown = [toy for toy in toys if toy not in TOYS] + [
        t for t in tabular_sets if t not in TABULAR
    ]
    if unknown:
        raise ValueError(f"unknown data sets {unknown}; expected toys {TOYS} or {TABULAR}")
    models = {name: catalogue[name] for name in names}
    grid: dict | None = {} if args.figure or args.output else None
    rows: list[dict] = []
    for toy in toys:
        grid_size = 40 if args.quick else 150
        rows += run_toy(toy, models, budget, grid, grid_size, args.seed, args.trainer)
    if args.study is None:
        tabular_models = [m for m in TABULAR_MODELS if m in names]
        for name in tabular_sets:
            test_limit = 200 if args.quick else None
            rows += run_tabular(name, tabular_models, budget, args.seed, test_limit, args.trainer)
    table = markdown_table(rows)
    print()
    print(table)
    costs = cost_table(rows)
    if costs:
        print()
        print(costs)
    if "student_t" in toys:
        print(f"\nstudent_t exact NLL: {student_t_nll():.3f}")
    if args.figure and grid:
        plot_grid(grid, toys, list(models), args.figure)
    result = {"rows": rows, "table": table, "budget": budget.__dict__}
    if args.output:
        with open(args.output, "w") as file:
            json.dump(result, file, indent=1)
        if grid:
            torch.save(grid, grid_path(args.output))
    return result


if __name__ == "__main__":
    main()
