"""Coupling functions: elementwise monotone bijections ``x = h(z; theta)``.

A coupling function is the ``h`` of the reference text's coupling and autoregressive
flows. It is given its parameters ``theta`` (produced by a conditioner network) and
knows nothing about networks: it holds no ``nn.Module`` state, only a few constants.

Shapes: ``z`` and ``x`` have shape ``(..., D)``; ``params`` has shape
``(..., D, num_params)``; both directions return the output and the elementwise
``log |dx/dz|`` with shape ``(..., D)``.

Every function is the identity when ``params`` is all zeros, so a conditioner
initialized to output (close to) zero gives a flow that starts (close to) the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_nf._validation import integer, positive_number

__all__ = [
    "CouplingFunction",
    "Affine",
    "Additive",
    "RationalQuadraticSpline",
    "coupling_function",
]


class CouplingFunction:
    """An elementwise monotone bijection ``x = h(z; theta)`` and its log-derivative."""

    num_params: int = 0

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """z -> x: returns ``x`` and ``log |dx/dz|``, both of shape ``z.shape``."""
        raise NotImplementedError

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """x -> z: returns ``z`` and ``log |dx/dz|`` (at that ``z``), both of shape ``x.shape``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Affine(CouplingFunction):
    r"""Affine coupling function with a soft-clamped log-scale (real NVP, IAF, MAF).

    .. math:: x = z \exp(s) + b, \qquad s = c \tanh(\tilde s / c)

    ``params[..., 0]`` is the shift ``b`` and ``params[..., 1]`` the unconstrained
    log-scale ``\tilde s``. The soft clamp keeps ``|s| < c`` (``log_scale_bound``)
    so no raw exponential of an unbounded network output is ever taken.

    Example:
        >>> h = Affine()
        >>> z = torch.randn(5, 3)
        >>> x, log_dx_dz = h.forward(z, torch.zeros(5, 3, 2))
        >>> bool(torch.equal(x, z)), float(log_dx_dz.abs().max())
        (True, 0.0)
    """

    num_params = 2

    def __init__(self, log_scale_bound: float = 3.0) -> None:
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be positive, got {log_scale_bound!r}")
        self.log_scale_bound = float(log_scale_bound)

    def _shift_and_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw_log_scale = params.unbind(-1)
        bound = self.log_scale_bound
        # c tanh(u / c) = 2c sigmoid(2u / c) - c: the same function, written with the
        # logistic function because torch's float32 tanh on the CPU takes about six
        # times as long as its sigmoid (the clamp was the costliest elementwise step
        # of a coupling layer).
        return shift, torch.sigmoid(raw_log_scale * (2.0 / bound)) * (2.0 * bound) - bound

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(params)
        return torch.addcmul(shift, z, torch.exp(log_scale)), log_scale

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(params)
        return (x - shift) * torch.exp(-log_scale), log_scale

    def __repr__(self) -> str:
        return f"Affine(log_scale_bound={self.log_scale_bound})"


class Additive(CouplingFunction):
    r"""Additive (volume-preserving) coupling function of NICE: :math:`x = z + b`.

    ``params[..., 0]`` is the shift ``b``; the log-derivative is zero.
    """

    num_params = 1

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return z + params[..., 0], torch.zeros_like(z)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x - params[..., 0], torch.zeros_like(x)


class RationalQuadraticSpline(CouplingFunction):
    r"""Monotone rational-quadratic spline with linear tails (Durkan et al., 2019).

    On ``[-B, B]`` the map is a piecewise rational-quadratic function through
    ``K + 1`` knots ``(x^{(k)}, y^{(k)})`` from ``(-B, -B)`` to ``(B, B)`` with
    positive derivatives ``d^{(k)}`` at the knots. In bin ``k``, with
    ``\theta = (z - x^{(k)}) / w_k`` and ``s_k = h_k / w_k``:

    .. math::
        x = y^{(k)} + \frac{h_k [s_k \theta^2 + d^{(k)} \theta (1 - \theta)]}
                           {s_k + [d^{(k+1)} + d^{(k)} - 2 s_k] \theta (1 - \theta)}

    Outside the interval the map continues as a straight line whose slope is the
    boundary derivative, so value and derivative are continuous at the end knots:

    .. math::
        x = -B + d^{(0)} (z + B) \ \ (z < -B), \qquad
        x = B + d^{(K)} (z - B) \ \ (z > B).

    With ``tails="linear"`` (default) the two boundary derivatives are learned, so
    every layer can stretch or compress the mass beyond the knots and the density
    has no edge at ``\pm B``. With ``tails="identity"`` they are fixed to 1 (the
    original neural spline flow and Pyro's ``Spline``): the map is the identity
    outside ``[-B, B]``.

    ``params[..., :K]`` are the unnormalized bin widths, ``params[..., K:2K]`` the
    unnormalized bin heights and the rest the unconstrained derivatives: ``K + 1`` of
    them with linear tails (``num_params = 3K + 1``), the ``K - 1`` interior ones
    with identity tails (``num_params = 3K - 1``). All zeros give the identity.

    The defaults (16 bins on ``[-5, 5]``, linear tails) come from the density suite
    (``benchmarks/density.py --study splines``, docs/benchmarks/density.md): a bound of
    3 cannot place data beyond ±3 (the spline maps ``[-B, B]`` onto itself, so that
    mass must come from the base's tail), 8 bins on the wider interval are too coarse
    for thin rings, and identity tails score heavy-tailed data far worse.

    Arguments:
        num_bins: the number of bins ``K``.
        bound: the half-width ``B`` of the interval where the spline bends.
        tails: ``"linear"`` (learned boundary slopes) or ``"identity"`` (slope 1).
        min_bin_width: floor of the bin widths (a fraction of ``2B``), for conditioning.
        min_bin_height: floor of the bin heights (a fraction of ``2B``), for conditioning.
        min_derivative: floor of the knot derivatives (and tail slopes), for conditioning.

    References:
        Neural Spline Flows (Durkan et al., 2019), arXiv:1906.04032.

    Example:
        >>> h = RationalQuadraticSpline(num_bins=4)
        >>> params = torch.randn(10, 2, h.num_params)
        >>> z = 2 * torch.randn(10, 2)
        >>> x, _ = h.forward(z, params)
        >>> torch.allclose(h.inverse(x, params)[0], z, atol=1e-5)
        True
    """

    def __init__(
        self,
        num_bins: int = 16,
        bound: float = 5.0,
        tails: str = "linear",
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        num_bins = integer("num_bins", num_bins)
        bound = positive_number("bound", bound)
        if tails not in ("linear", "identity"):
            raise ValueError(f"tails must be 'linear' or 'identity', got {tails!r}")
        if min_bin_width * num_bins >= 1 or min_bin_height * num_bins >= 1:
            raise ValueError("min_bin_width and min_bin_height times num_bins must be < 1")
        if not 0 < min_derivative < 1:
            raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative!r}")
        self.num_bins = num_bins
        self.bound = float(bound)
        self.tails = tails
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative
        # softplus(offset) + min_derivative == 1: zero parameters give unit derivatives.
        self._derivative_offset = math.log(math.expm1(1.0 - min_derivative))

    @property
    def num_params(self) -> int:  # type: ignore[override]
        return 3 * self.num_bins + (1 if self.tails == "linear" else -1)

    def _knots(self, raw: Tensor, minimum: float) -> tuple[Tensor, Tensor]:
        """Knot positions ``(..., K + 1)`` from -B to B and bin sizes ``(..., K)``."""
        sizes = minimum + (1 - minimum * self.num_bins) * _softmax(raw)
        interior = 2 * self.bound * torch.cumsum(sizes, dim=-1)[..., :-1] - self.bound
        end = interior.new_full(interior.shape[:-1] + (1,), self.bound)
        knots = torch.cat([-end, interior, end], dim=-1)
        return knots, knots[..., 1:] - knots[..., :-1]

    def _spline(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        k = self.num_bins
        x_knots, widths = self._knots(params[..., :k], self.min_bin_width)
        y_knots, heights = self._knots(params[..., k : 2 * k], self.min_bin_height)
        derivatives = self.min_derivative + F.softplus(
            params[..., 2 * k :] + self._derivative_offset
        )
        if self.tails == "identity":
            derivatives = F.pad(derivatives, (1, 1), value=1.0)
        return x_knots, widths, y_knots, heights, derivatives

    def _tails(
        self, value: Tensor, derivatives: Tensor, inverse: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The tail map at ``value``: (output, log-slope, mask of points in a tail).

        Forward ``x = +-B + d (z -+ B)``; inverse ``z = +-B + (x -+ B) / d``.
        """
        below = value <= -self.bound
        outside = below | (value >= self.bound)
        if self.tails == "identity":
            return value, torch.zeros_like(value), outside
        slope = torch.where(below, derivatives[..., 0], derivatives[..., -1])
        edge = torch.where(below, -self.bound, self.bound)
        scaled = (value - edge) / slope if inverse else (value - edge) * slope
        return edge + scaled, torch.log(slope), outside

    @staticmethod
    def _bin_index(knots: Tensor, value: Tensor) -> Tensor:
        # Bins are searched among the interior knots only, so the index is in [0, K-1].
        return torch.searchsorted(knots[..., 1:-1].contiguous(), value.unsqueeze(-1))

    @staticmethod
    def _gather(tensors: tuple[Tensor, ...], index: Tensor) -> list[Tensor]:
        return [t.gather(-1, index).squeeze(-1) for t in tensors]

    def _log_derivative(
        self, theta: Tensor, slope: Tensor, d_left: Tensor, d_right: Tensor, denominator: Tensor
    ) -> Tensor:
        one_minus = 1 - theta
        numerator = slope.pow(2) * (
            d_right * theta.pow(2) + 2 * slope * theta * one_minus + d_left * one_minus.pow(2)
        )
        return torch.log(numerator) - 2 * torch.log(denominator)

    def forward(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        z_in = z.clamp(-self.bound, self.bound)
        x_knots, widths, y_knots, heights, derivatives = self._spline(params)
        index = self._bin_index(x_knots, z_in)
        x_k, w_k, y_k, h_k, d_left, d_right = self._gather(
            (x_knots, widths, y_knots, heights, derivatives, derivatives[..., 1:]), index
        )
        slope = h_k / w_k
        theta = ((z_in - x_k) / w_k).clamp(0, 1)
        mixed = theta * (1 - theta)
        denominator = slope + (d_right + d_left - 2 * slope) * mixed
        x_in = y_k + h_k * (slope * theta.pow(2) + d_left * mixed) / denominator
        log_derivative = self._log_derivative(theta, slope, d_left, d_right, denominator)
        x_out, log_out, outside = self._tails(z, derivatives, inverse=False)
        return torch.where(outside, x_out, x_in), torch.where(outside, log_out, log_derivative)

    def inverse(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        x_in = x.clamp(-self.bound, self.bound)
        x_knots, widths, y_knots, heights, derivatives = self._spline(params)
        index = self._bin_index(y_knots, x_in)
        x_k, w_k, y_k, h_k, d_left, d_right = self._gather(
            (x_knots, widths, y_knots, heights, derivatives, derivatives[..., 1:]), index
        )
        slope = h_k / w_k
        offset = x_in - y_k
        curvature = d_right + d_left - 2 * slope
        a = h_k * (slope - d_left) + offset * curvature
        b = h_k * d_left - offset * curvature
        c = -slope * offset
        discriminant = (b.pow(2) - 4 * a * c).clamp_min(0)
        # The root in [0, 1], written to avoid cancellation when a is close to 0.
        theta = ((2 * c) / (-b - torch.sqrt(discriminant))).clamp(0, 1)
        z_in = x_k + theta * w_k
        mixed = theta * (1 - theta)
        denominator = slope + curvature * mixed
        log_derivative = self._log_derivative(theta, slope, d_left, d_right, denominator)
        z_out, log_out, outside = self._tails(x, derivatives, inverse=True)
        return torch.where(outside, z_out, z_in), torch.where(outside, log_out, log_derivative)

    def __repr__(self) -> str:
        return (
            f"RationalQuadraticSpline(num_bins={self.num_bins}, bound={self.bound}, "
            f"tails={self.tails!r})"
        )


def _softmax(raw: Tensor) -> Tensor:
    # torch.softmax over a short last dimension (K bins) is about 6x slower on CPU than
    # these elementwise ops, and the spline's two softmaxes dominated its cost.
    exponential = torch.exp(raw - raw.detach().amax(dim=-1, keepdim=True))
    return exponential / exponential.sum(dim=-1, keepdim=True)


def coupling_function(name: str | CouplingFunction, **kwargs: object) -> CouplingFunction:
    """Build a coupling function from a name: ``"affine"``, ``"additive"`` or ``"spline"``.

    A :class:`CouplingFunction` instance is returned as it is.
    """
    if isinstance(name, CouplingFunction):
        return name
    registry = {"affine": Affine, "additive": Additive, "spline": RationalQuadraticSpline}
    if name not in registry:
        raise ValueError(f"unknown coupling function {name!r}; expected one of {sorted(registry)}")
    return registry[name](**kwargs)
