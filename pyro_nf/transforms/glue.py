"""Glue layers placed between flow layers: permutations, ActNorm and an LU linear map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pyro_nf._validation import integer
from pyro_nf.nn.made import autoregressive_order
from pyro_nf.transforms.base import FlowTransform, describe_order, zeros_like_batch

__all__ = ["Permutation", "ActNorm", "LULinear"]


class Permutation(FlowTransform):
    r"""A fixed permutation of the coordinates: :math:`x_i = z_{\pi(i)}`.

    Volume preserving (log-determinant 0). Direction: both ways are one gather.
    The permutation is a buffer, so it moves with ``.to(device)`` and is saved in
    the ``state_dict``.

    Arguments:
        permutation: a permutation of ``range(D)`` as a sequence or tensor.

    Example:
        >>> p = Permutation.reverse(3)
        >>> p(torch.tensor([1.0, 2.0, 3.0]))
        tensor([3., 2., 1.])
    """

    def __init__(self, permutation: Tensor | list[int]) -> None:
        permutation = torch.as_tensor(permutation)
        permutation = autoregressive_order(permutation, permutation.numel())
        super().__init__(permutation.numel())
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    @classmethod
    def reverse(cls, dim: int) -> Permutation:
        """The order reversal ``x = z[..., ::-1]``."""
        return cls(autoregressive_order("reverse", integer("dim", dim)))

    @classmethod
    def random(cls, dim: int, seed: int = 0) -> Permutation:
        """A random permutation drawn from a generator seeded with ``seed``."""
        return cls(autoregressive_order("random", integer("dim", dim), seed))

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        # index_select: several times faster than advanced indexing, also in backward.
        return z.index_select(-1, self.permutation), zeros_like_batch(z)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return x.index_select(-1, self.inverse_permutation), zeros_like_batch(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, permutation={describe_order(self.permutation)}"


class ActNorm(FlowTransform):
    r"""Activation normalization (Glow): an elementwise affine map with learned parameters.

    .. math:: x = z \odot \exp(s) + b, \qquad \log|\det \partial x/\partial z| = \sum_i s_i

    Data-dependent initialization: the first density evaluation (x -> z) in training
    mode sets ``b`` and ``s`` to the mean and log standard deviation of that batch of
    ``x``, so the layer's output ``z`` starts standardized. A first call in the
    sampling direction (z -> x) keeps the identity. ``initialized`` is a buffer, so a
    loaded ``state_dict`` is never re-initialized.

    Direction: both ways are one elementwise pass.

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal,
        2018), arXiv:1807.03039.

    Example:
        >>> layer = ActNorm(2)
        >>> x = torch.randn(100, 2) * 3 + 1
        >>> z = layer.inv(x)
        >>> bool(z.mean(0).abs().max() < 1e-5)
        True
    """

    initializes_from_data = True

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim)
        self.eps = eps
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized_seen = False

    def _known_initialized(self) -> bool:
        # Reading the buffer synchronizes with the GPU, so it is read until it says True.
        if not self._initialized_seen:
            self._initialized_seen = bool(self.initialized)
        return self._initialized_seen

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_seen = False

    @torch.no_grad()
    def _initialize_from(self, x: Tensor) -> None:
        flat = x.detach().reshape(-1, self.dim)
        if flat.shape[0] > 1:
            self.shift.copy_(flat.mean(0))
            self.log_scale.copy_(torch.log(flat.std(0) + self.eps))
        self.initialized.fill_(True)

    def _log_det(self, value: Tensor) -> Tensor:
        return self.log_scale.sum().expand(value.shape[:-1])

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if not self._known_initialized():
            with torch.no_grad():
                self.initialized.fill_(True)
        return z * torch.exp(self.log_scale) + self.shift, self._log_det(z)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if self.training and not self._known_initialized():
            self._initialize_from(x)
        return (x - self.shift) * torch.exp(-self.log_scale), self._log_det(x)


class LULinear(FlowTransform):
    r"""An invertible linear map in LU form (Glow's invertible 1x1 convolution on vectors).

    .. math::
        x = W z + b, \qquad W = P \Big(I + \frac{A_L}{\sqrt D}\Big)
            \Big(\frac{A_U}{\sqrt D} + \operatorname{diag}(e^{s})\Big), \qquad
        \log|\det W| = \sum_i s_i

    ``P`` is a fixed permutation (a buffer), ``A_L`` strictly lower and ``A_U``
    strictly upper triangular (both learned, :attr:`lower` and :attr:`upper`), ``s``
    the learned log-diagonal. Initialized at the identity map. The off-diagonal
    factors are scaled by :math:`1/\sqrt D`, as in ``AutoFlow``'s affine layer: Adam
    moves every entry by about the learning rate, so unscaled the D^2 / 2 entries of
    a factor move the map by about the learning rate times D per step (real NVP guides
    with LU glue layers gave NaN at lr 1e-2 on a 100-latent posterior; scaled, they
    meet its moment bars at five of five seeds, ``docs/benchmarks/posteriors.md``).

    Direction: z -> x is one matrix product; x -> z two triangular solves.

    Arguments:
        dim: the event size D.
        permutation: ``P`` as ``"natural"`` (the identity, default; ``"identity"`` is an
            alias), ``"reverse"``, ``"random"`` or an explicit permutation, the same
            names as an autoregressive order (:func:`~pyro_nf.nn.autoregressive_order`).
        seed: the seed of a random ``P``.

    Example:
        >>> layer = LULinear(3)
        >>> z = torch.randn(4, 3)
        >>> torch.allclose(layer.inv(layer(z)), z)
        True
    """

    def __init__(self, dim: int, permutation: str = "natural", seed: int = 0) -> None:
        super().__init__(dim)
        order = autoregressive_order(permutation, self.dim, seed)
        self.register_buffer("permutation", order)
        self.register_buffer("inverse_permutation", torch.argsort(order))
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_diagonal = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("strict_lower_mask", torch.ones(dim, dim).tril(-1))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        scale = self.dim**-0.5
        lower = self.lower * (scale * self.strict_lower_mask) + eye
        upper = self.upper * (scale * self.strict_lower_mask.T)
        upper = upper + torch.diag(torch.exp(self.log_diagonal))
        return lower, upper

    def _log_det(self, value: Tensor) -> Tensor:
        return self.log_diagonal.sum().expand(value.shape[:-1])

    def forward_and_log_det(
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        lu_z = z @ (lower @ upper).T
        return lu_z[..., self.inverse_permutation] + self.bias, self._log_det(z)

    def inverse_and_log_det(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        lower, upper = self._factors()
        rhs = (x - self.bias)[..., self.permutation]
        flat = rhs.reshape(-1, self.dim).T
        solved = torch.linalg.solve_triangular(lower, flat, upper=False, unitriangular=True)
        solved = torch.linalg.solve_triangular(upper, solved, upper=True)
        return solved.T.reshape(x.shape), self._log_det(x)
