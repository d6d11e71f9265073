"""The transform contract: the checks every transform of the package passes.

Users can run it on transforms of their own::

    from pyro_nf.testing import TransformContract
    contract = TransformContract(lambda: MyTransform(dim=3), dim=3)
    contract.check_all()

Each ``check_*`` method builds fresh transforms from the factory (in float64 unless
the check is about dtypes), perturbs their parameters so that a transform initialized
at the identity is not tested at the identity, and raises ``AssertionError`` on a
violation, or :class:`NotApplicable` when the check does not apply to the transform
(a permutation has no parameters to train). The test suite parametrizes over
:data:`CONTRACT_CHECKS`, so a failure names the check.

A check leaves no trace: the global random state, the default dtype and the Pyro
parameter store are as they were afterwards, also when the check fails.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransform
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import Tensor
from torch.distributions import Transform

from pyro_nf.flows import FlowDistribution

__all__ = ["TransformContract", "CONTRACT_CHECKS", "NotApplicable", "perturb_parameters"]

BATCH_SHAPES: tuple[tuple[int, ...], ...] = ((), (5,), (4, 3))
#: Sample shapes of the read-only check: a single draw, a batch of one (where an
#: expanded parameter can alias its output), an empty batch, a batch, and two batch dims.
READ_SAMPLE_SHAPES: tuple[tuple[int, ...], ...] = ((), (1,), (0,), (5,), (4, 3))


class NotApplicable(Exception):
    """Raised by a contract check that does not apply to the transform it was given."""


@contextlib.contextmanager
def _no_trace(store_prefix: str) -> Iterator[None]:
    """Restore the random state and the default dtype, and drop the Pyro parameters
    named ``store_prefix*``, whatever happens inside."""
    dtype = torch.get_default_dtype()
    store = pyro.get_param_store()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_default_dtype(dtype)
        for name in [name for name in store.keys() if name.startswith(store_prefix)]:
            del store[name]


def _leaves_no_trace(check: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(check)
    def wrapper(self: TransformContract, *args: object) -> None:
        with _no_trace(self._store_prefix):
            check(self, *args)

    return wrapper


def _state_snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed_entries(module: torch.nn.Module, snapshot: dict[str, Tensor]) -> list[str]:
    """Names of parameters and buffers that differ bit for bit (or appeared or vanished)."""
    state = module.state_dict()
    changed = sorted(set(state) ^ set(snapshot))
    for name, tensor in state.items():
        if name in snapshot and not (
            tensor.shape == snapshot[name].shape
            and tensor.dtype == snapshot[name].dtype
            and torch.equal(tensor, snapshot[name])
        ):
            changed.append(name)
    return changed


def perturb_parameters(
    module: torch.nn.Module, scale: float = 0.3, seed: int = 0
) -> torch.nn.Module:
    """Add seeded Gaussian noise of standard deviation ``scale`` to every parameter, in place.

    Flows start near the identity, where wrong log-determinants and inverses hide; the
    checks move them away first. Returns ``module``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            parameter.add_(scale * noise.to(parameter))
    return module


def _is_conditional(transform: Transform, context_dim: int) -> bool:
    return context_dim > 0 and isinstance(transform, ConditionalTransform)


def _fresh_pass(bound: Transform, value: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """One uncached pass (x -> z if ``inverse`` else z -> x) and ``log |det dx/dz|``.

    A package transform (or a binding of one) runs its ``*_and_log_det`` method; any
    other Pyro transform runs ``_call`` / ``_inverse`` and ``log_abs_det_jacobian`` on
    clones, which no cache can recognise.
    """
    parent = getattr(bound, "transform", bound)
    method = "inverse_and_log_det" if inverse else "forward_and_log_det"
    if hasattr(parent, method):
        context = getattr(bound, "context", None) if parent is not bound else None
        return getattr(parent, method)(value, context)
    output = bound._inverse(value) if inverse else bound._call(value)
    z, x = (output, value) if inverse else (value, output)
    return output, bound.log_abs_det_jacobian(z.clone(), x.clone())


def _fresh_forward(bound: Transform, z: Tensor) -> tuple[Tensor, Tensor]:
    """One uncached z -> x pass and its log-determinant."""
    return _fresh_pass(bound, z, inverse=False)


def _fresh_inverse(bound: Transform, x: Tensor) -> tuple[Tensor, Tensor]:
    """One uncached x -> z pass and ``log |det dx/dz|`` at that point."""
    return _fresh_pass(bound, x, inverse=True)


@dataclass
class TransformContract:
    """The contract checks for one transform factory.

    Example:
        >>> from pyro_nf.transforms import Permutation
        >>> results = TransformContract(lambda: Permutation.reverse(3), dim=3).check_all()
        >>> results["check_log_det_matches_jacobian"], results["check_gradients"]
        ('passed', 'not applicable: the transform has no parameters to differentiate')

    Arguments:
        factory: builds a fresh transform (z -> x) in the default dtype on the CPU.
        dim: the event size D.
        context_dim: the context size (0 for an unconditional transform).
        perturb_scale: standard deviation of the noise added to every parameter.
        input_scale: standard deviation of the test inputs.
        round_trip_tolerance: relative and absolute tolerance of the round trips.
        log_det_tolerance: absolute tolerance of the log-determinant checks.
        seed: seed of parameters, perturbations and inputs.
        svi_steps: the number of SVI steps of :meth:`check_svi_steps`.
        device: where the checks run ("cpu" or "cuda").
    """

    factory: Callable[[], Transform]
    dim: int
    context_dim: int = 0
    perturb_scale: float = 0.3
    input_scale: float = 1.5
    round_trip_tolerance: float = 1e-10
    log_det_tolerance: float = 1e-8
    seed: int = 0
    svi_steps: int = 3
    device: str = "cpu"

    # ------------------------------------------------------------------ helpers
    @property
    def _store_prefix(self) -> str:
        return f"pyro_nf_contract_{id(self)}_"

    def make(
        self,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        seed: int | None = None,
    ) -> Transform:
        """A fresh transform with perturbed parameters, moved to ``dtype`` and ``device``."""
        seed = self.seed if seed is None else seed
        device = self.device if device is None else device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transform = self.factory()
        if isinstance(transform, torch.nn.Module):
            transform = transform.to(device=device, dtype=dtype)
            perturb_parameters(transform, self.perturb_scale, seed + 1)
        return transform

    def inputs(
        self,
        batch_shape: tuple[int, ...] = (6,),
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        seed: int = 1,
    ) -> tuple[Tensor, Tensor | None]:
        """Points ``(*batch_shape, D)`` and, for a conditional transform, a context."""
        device = self.device if device is None else device
        generator = torch.Generator().manual_seed(self.seed + seed)
        shape = (*batch_shape, self.dim)
        value = self.input_scale * torch.randn(shape, generator=generator, dtype=dtype)
        context = None
        if self.context_dim > 0:
            context = torch.randn(
                (*batch_shape, self.context_dim), generator=generator, dtype=dtype
            )
            context = context.to(device)
        return value.to(device), context

    def bind(self, transform: Transform, context: Tensor | None) -> Transform:
        """The transform itself, or the transform conditioned on ``context``."""
        if _is_conditional(transform, self.context_dim):
            return transform.condition(context)
        return transform

    def base(self, like: Tensor) -> dist.Distribution:
        zeros = like.new_zeros(like.shape[-1:])
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def _assert_close(self, actual: Tensor, expected: Tensor, tolerance: float, what: str) -> None:
        torch.testing.assert_close(
            actual, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}: {m}"
        )

    # ------------------------------------------------------------------ checks
    @_leaves_no_trace
    def check_round_trip(self) -> None:
        """z -> x -> z and x -> z -> x, uncached and through the cache, in float64."""
        transform = self.make()
        z, context = self.inputs()
        bound = self.bind(transform, context)
        tol = self.round_trip_tolerance
        x, _ = _fresh_forward(bound, z)
        self._assert_close(_fresh_inverse(bound, x)[0], z, tol, "uncached z -> x -> z")
        x_data, _ = self.inputs(seed=2)
        z_data, _ = _fresh_inverse(bound, x_data)
        self._assert_close(_fresh_forward(bound, z_data)[0], x_data, tol, "uncached x -> z -> x")
        x_cached = bound(z)
        self._assert_close(x_cached, x, tol, "cached forward equals the uncached pass")
        assert bound.inv(x_cached) is z, "the inverse of a cached pair must return its input"
        self._assert_close(bound(bound.inv(x_data)), x_data, tol, "cached x -> z -> x")

    @_leaves_no_trace
    def check_log_det_matches_jacobian(self) -> None:
        """log|det dx/dz| (both passes) equals slogdet of the autograd Jacobian, float64."""
        transform = self.make()
        z, context = self.inputs(batch_shape=(4,))
        for i in range(z.shape[0]):
            context_i = None if context is None else context[i]
            bound = self.bind(transform, context_i)

            def forward(point: Tensor, bound: Transform = bound) -> Tensor:
                return _fresh_forward(bound, point)[0]

            jacobian = torch.autograd.functional.jacobian(forward, z[i])
            expected = torch.linalg.slogdet(jacobian).logabsdet
            x_i, log_det_forward = _fresh_forward(bound, z[i])
            _, log_det_inverse = _fresh_inverse(bound, x_i.detach())
            tol = self.log_det_tolerance
            self._assert_close(log_det_forward, expected, tol, f"forward log-det, sample {i}")
            self._assert_close(log_det_inverse, expected, tol, f"inverse log-det, sample {i}")
            self._assert_close(
                bound.log_abs_det_jacobian(z[i], bound(z[i])), expected, tol, "cached log-det"
            )

    @_leaves_no_trace
    def check_batch_shapes(self) -> None:
        """Outputs keep the batch shape; log-dets have it; log_prob matches a hand computation."""
        transform = self.make()
        for batch_shape in BATCH_SHAPES:
            z, context = self.inputs(batch_shape=batch_shape)
            bound = self.bind(transform, context)
            x = bound(z)
            assert x.shape == z.shape, f"forward: {tuple(x.shape)} != {tuple(z.shape)}"
            log_det = bound.log_abs_det_jacobian(z, x)
            assert log_det.shape == batch_shape, (
                f"log-det shape {tuple(log_det.shape)} for {batch_shape}"
            )
            x_data, _ = self.inputs(batch_shape=batch_shape, seed=3)
            assert bound.inv(x_data).shape == x_data.shape
            base = self.base(z)
            distribution = dist.TransformedDistribution(base, [bound])
            log_prob = distribution.log_prob(x_data)
            z_data, log_det_data = _fresh_inverse(bound, x_data)
            by_hand = base.log_prob(z_data) - log_det_data
            assert log_prob.shape == batch_shape
            self._assert_close(log_prob, by_hand, self.log_det_tolerance, f"log_prob {batch_shape}")

    @_leaves_no_trace
    def check_gradients(self) -> None:
        """rsample and log_prob give every parameter a finite gradient, in train and eval mode."""
        transform = self.make()
        parameters = [p for p in transform.parameters() if p.requires_grad]
        if not parameters:
            raise NotApplicable("the transform has no parameters to differentiate")
        for mode in ("train", "eval"):
            transform.train(mode == "train")
            for parameter in parameters:
                parameter.grad = None
            x_data, context = self.inputs(batch_shape=(8,), seed=4)
            bound = self.bind(transform, context)
            distribution = dist.TransformedDistribution(self.base(x_data), [bound])
            draws = distribution.rsample()
            assert draws.requires_grad, "rsample is not differentiable"
            loss = draws.pow(2).sum() - distribution.log_prob(x_data).sum()
            loss.backward()
            for name, parameter in transform.named_parameters():
                assert parameter.grad is not None, f"{mode} mode: no gradient reached {name}"
                assert torch.isfinite(parameter.grad).all(), (
                    f"{mode} mode: non-finite grad of {name}"
                )
        transform.train()

    @_leaves_no_trace
    def check_state_dict_round_trip(self) -> None:
        """A transform loaded from another's state_dict gives identical outputs."""
        source = self.make()
        target = self.make(seed=self.seed + 100)
        z, context = self.inputs()
        _fresh_forward(self.bind(source, context), z)  # a forward call before saving
        target.load_state_dict(source.state_dict())
        x_source = _fresh_forward(self.bind(source, context), z)[0]
        x_target = _fresh_forward(self.bind(target, context), z)[0]
        assert torch.equal(x_source, x_target), "outputs differ after load_state_dict"
        z_back = _fresh_inverse(self.bind(target, context), x_source)[0]
        assert torch.equal(z_back, _fresh_inverse(self.bind(source, context), x_source)[0])

    @_leaves_no_trace
    def check_copy_and_pickle(self) -> None:
        """deepcopy, pickle and torch.save work after a cached forward call, also for .inv."""
        transform = self.make()
        z, context = self.inputs()
        bound = self.bind(transform, context)
        x = bound(z)  # leaves a cached pair holding an autograd graph
        bound.log_abs_det_jacobian(z, x)
        expected = _fresh_forward(bound, z)[0].detach()
        cases: list[tuple[str, object, Callable[[object], Transform]]] = [
            ("transform", transform, lambda clone: self.bind(clone, context)),
            ("transform.inv", transform.inv, lambda clone: self.bind(clone.inv, context)),
        ]
        if bound is not transform:
            cases += [
                ("bound", bound, lambda clone: clone),
                ("bound.inv", bound.inv, lambda c: c.inv),
            ]
        for name, obj, forward_of in cases:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            buffer.seek(0)
            clones = {
                "deepcopy": copy.deepcopy(obj),
                "pickle": pickle.loads(pickle.dumps(obj)),
                "torch.save": torch.load(buffer, weights_only=False),
            }
            for how, clone in clones.items():
                output = forward_of(clone)(z).detach()
                self._assert_close(output, expected, 0.0, f"{how} of {name}")

    @_leaves_no_trace
    def check_double_under_float32_default(self) -> None:
        """``.double()`` works in both directions while the default dtype stays float32."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            transform = self.make(dtype=torch.float32).double()
            z, context = self.inputs(dtype=torch.float64)
            bound = self.bind(transform, context)
            x, log_det = _fresh_forward(bound, z)
            z_back, log_det_back = _fresh_inverse(bound, x)
            for name, value in (
                ("x", x),
                ("z", z_back),
                ("log-det", log_det),
                ("log-det", log_det_back),
            ):
                assert value.dtype == torch.float64, f"{name} has dtype {value.dtype}"
            self._assert_close(z_back, z, 1e-6, "float64 round trip")
        finally:
            torch.set_default_dtype(previous)

    @_leaves_no_trace
    def check_cache_consistency(self) -> None:
        """The cached log-det of a forward pair equals a fresh computation."""
        transform = self.make()
        z, context = self.inputs()
        bound = self.bind(transform, context)
        x = bound(z)
        cached = bound.log_abs_det_jacobian(z, x)
        fresh = _fresh_forward(bound, z.clone())[1]
        self._assert_close(cached, fresh, self.log_det_tolerance, "cached vs fresh log-det")
        x_data, _ = self.inputs(seed=5)
        z_data = bound.inv(x_data)
        fresh_inverse = _fresh_inverse(bound, x_data.clone())[1]
        self._assert_close(
            bound.log_abs_det_jacobian(z_data, x_data),
            fresh_inverse,
            self.log_det_tolerance,
            "inverse pair",
        )

    @_leaves_no_trace
    def check_svi_steps(self) -> None:
        """Several Pyro SVI steps in a row with the transform as a guide raise nothing."""
        transform = self.make(dtype=torch.float32)
        _, context = self.inputs(batch_shape=(), dtype=torch.float32)
        name = f"{self._store_prefix}{id(transform)}"

        def model() -> None:
            loc = torch.ones(self.dim, device=self.device, dtype=torch.float32)
            pyro.sample("latent", dist.Normal(loc, 2 * torch.ones_like(loc)).to_event(1))

        def guide() -> None:
            pyro.module(name, transform)
            base = self.base(torch.zeros(self.dim, device=self.device, dtype=torch.float32))
            pyro.sample(
                "latent", dist.TransformedDistribution(base, [self.bind(transform, context)])
            )

        svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
        losses = [svi.step() for _ in range(self.svi_steps)]
        assert all(torch.isfinite(torch.tensor(losses))), f"non-finite SVI losses {losses}"

    @_leaves_no_trace
    def check_fresh_density_with_same_data_tensor(self) -> None:
        """Full-batch training with one data tensor object gets fresh log-densities each step."""
        transform = self.make(dtype=torch.float32)
        if not any(p.requires_grad for p in transform.parameters()):
            raise NotApplicable("the transform has no parameters to train")
        x_data, context = self.inputs(batch_shape=(16,), dtype=torch.float32, seed=6)
        bound = self.bind(transform, context)
        distribution = dist.TransformedDistribution(self.base(x_data), [bound])
        optimizer = torch.optim.Adam(transform.parameters(), lr=1e-2)
        previous = None
        for step in range(3):
            optimizer.zero_grad()
            log_prob = distribution.log_prob(x_data)
            z_data, log_det = _fresh_inverse(bound, x_data)
            expected = self.base(x_data).log_prob(z_data) - log_det
            self._assert_close(log_prob, expected, 1e-5, f"log_prob at step {step}")
            if previous is not None:
                assert not torch.equal(log_prob.detach(), previous), "log_prob did not change"
            previous = log_prob.detach()
            (-log_prob.mean()).backward()
            optimizer.step()

    @_leaves_no_trace
    def check_backward_twice_without_step(self) -> None:
        """Two log_prob + backward rounds on one data tensor, no step between: no error.

        The cache must not hand out a value whose graph the first backward freed, and
        the second round must give the same log-density.
        """
        transform = self.make(dtype=torch.float32)
        x_data, context = self.inputs(batch_shape=(8,), dtype=torch.float32, seed=7)
        bound = self.bind(transform, context)
        distribution = dist.TransformedDistribution(self.base(x_data), [bound])
        values = []
        for _ in range(2):
            log_prob = distribution.log_prob(x_data)
            if log_prob.requires_grad:
                log_prob.sum().backward()
            values.append(log_prob.detach())
        self._assert_close(values[1], values[0], 1e-6, "second log_prob")

    @_leaves_no_trace
    def check_shape_errors(self) -> None:
        """A wrong last dimension (or context) raises a ValueError naming both sizes."""
        transform = self.make()
        _, context = self.inputs()
        bound = self.bind(transform, context)
        wrong = torch.randn(6, self.dim + 1, dtype=torch.float64, device=self.device)
        for name, call in (
            ("forward", lambda: bound(wrong)),
            ("inverse", lambda: bound.inv(wrong)),
        ):
            try:
                call()
            except ValueError as error:
                message = str(error)
                assert str(self.dim) in message and str(self.dim + 1) in message, (
                    f"{name}: the error should name the expected size {self.dim} and the "
                    f"given size {self.dim + 1}: {message!r}"
                )
            else:
                raise AssertionError(f"{name}: no ValueError for last dimension {self.dim + 1}")
        if _is_conditional(transform, self.context_dim):
            bad_context = torch.randn(
                6, self.context_dim + 2, dtype=torch.float64, device=self.device
            )
            try:
                transform.condition(bad_context)(
                    torch.randn(6, self.dim, dtype=torch.float64, device=self.device)
                )
            except ValueError as error:
                assert str(self.context_dim) in str(error) and str(self.context_dim + 2) in str(
                    error
                )
            else:
                raise AssertionError("no ValueError for a context of the wrong size")
            try:
                transform(torch.randn(6, self.dim, dtype=torch.float64, device=self.device))
            except ValueError:
                pass
            else:
                raise AssertionError("a conditional transform called without context must raise")

    @_leaves_no_trace
    def check_device(self, device: str | torch.device) -> None:
        """Both directions and log_prob run on ``device`` and return tensors there."""
        device = torch.device(device)
        transform = self.make(dtype=torch.float32, device=device)
        z, context = self.inputs(dtype=torch.float32, device=device)
        bound = self.bind(transform, context)
        x = bound(z)
        log_prob = dist.TransformedDistribution(self.base(z), [bound]).log_prob(x)
        for value in (x, bound.inv(z), log_prob):
            assert value.device.type == device.type, f"output on {value.device}, expected {device}"

    @_leaves_no_trace
    def check_reads_never_write(self) -> None:
        """Sampling, scoring and inverting leave every parameter and buffer bit-identical.

        Reads are ``sample`` and ``rsample`` of the transformed distribution, its
        ``log_prob`` of its own draws and of foreign points, the transform in both
        directions (``t(z)``, ``t.inv(x)``, the log-det), through a conditioned binding
        when the transform is conditional: for every shape of
        :data:`READ_SAMPLE_SHAPES`, with autograd on and off, in train and eval mode.
        Data-dependent initialisation (ActNorm's first pass) is the one documented
        write: one pass runs before the state is recorded.
        """
        transform = self.make()
        if not isinstance(transform, torch.nn.Module):
            raise NotApplicable("the transform is not an nn.Module: it holds no state")
        warm_up, context = self.inputs(batch_shape=(8,))
        _fresh_inverse(self.bind(transform, context), warm_up)
        snapshot = _state_snapshot(transform)
        _, context = self.inputs(batch_shape=())
        base = self.base(warm_up)
        for mode in ("train", "eval"):
            transform.train(mode == "train")
            for grad in (True, False):
                for shape in READ_SAMPLE_SHAPES:
                    with torch.set_grad_enabled(grad):
                        bound = self.bind(transform, context)
                        distribution = FlowDistribution(base, [bound])
                        draws = distribution.sample(shape)
                        distribution.log_prob(draws)
                        if grad:
                            distribution.log_prob(distribution.rsample(shape))
                        foreign, _ = self.inputs(batch_shape=shape, seed=8)
                        distribution.log_prob(foreign)
                        z = bound.inv(foreign)
                        bound.log_abs_det_jacobian(z, foreign)
                        bound(foreign)
                    changed = _changed_entries(transform, snapshot)
                    assert not changed, (
                        f"reading the transform wrote into its state ({mode} mode, autograd "
                        f"{'on' if grad else 'off'}, sample shape {shape}): {changed}"
                    )
        transform.train()

    def check_all(self) -> dict[str, str]:
        """Run every check of :data:`CONTRACT_CHECKS` on the CPU.

        Returns ``{check: "passed"}`` or ``{check: "not applicable: <why>"}`` per check;
        a violated check raises ``AssertionError`` (or the error the transform raised).
        """
        results = {}
        for check in CONTRACT_CHECKS:
            try:
                getattr(self, check)()
            except NotApplicable as reason:
                results[check] = f"not applicable: {reason}"
            else:
                results[check] = "passed"
        return results


#: The contract's checks, in the order :meth:`TransformContract.check_all` runs them.
#: (``check_device`` takes the device as an argument and is run by the CUDA tests.)
CONTRACT_CHECKS: tuple[str, ...] = (
    "check_round_trip",
    "check_log_det_matches_jacobian",
    "check_batch_shapes",
    "check_gradients",
    "check_state_dict_round_trip",
    "check_copy_and_pickle",
    "check_double_under_float32_default",
    "check_cache_consistency",
    "check_svi_steps",
    "check_fresh_density_with_same_data_tensor",
    "check_backward_twice_without_step",
    "check_shape_errors",
    "check_reads_never_write",
)
