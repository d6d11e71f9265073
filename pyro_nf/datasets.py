"""Small, self-contained data sets for training and testing normalizing flows.

The module provides the two-dimensional toy densities that are used throughout the
normalizing-flow literature (two moons, eight Gaussians, checkerboard, rings, pinwheel,
two spirals, circles and a banana), in the spirit of FFJORD's ``lib/toy_data.py``.
Every sampler is generated in code (no downloads, no files) from a dedicated
:class:`torch.Generator` seeded by ``seed``, so the global random state is never touched
and the same seed always gives the same tensor. Samples are roughly standardized to lie
within about ``[-4, 4]`` in each coordinate.

All samples are drawn on the CPU in double precision and then converted to the requested
``dtype`` and ``device``, so results do not depend on the target device.

Besides the toy densities, :func:`load_digits` wraps scikit-learn's embedded 8x8
handwritten digits (an optional dependency) as a small, real, 64-dimensional data set.

Example:
    >>> from pyro_nf.datasets import toy_density, train_test_split
    >>> data = toy_density("two_moons", 1000, seed=0)
    >>> train, test = train_test_split(data, test_fraction=0.25)
    >>> train.shape, test.shape
    (torch.Size([750, 2]), torch.Size([250, 2]))
"""

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "TOY_DENSITIES",
    "banana",
    "checkerboard",
    "circles",
    "eight_gaussians",
    "load_digits",
    "pinwheel",
    "rings",
    "toy_density",
    "train_test_split",
    "two_moons",
    "two_spirals",
]

Device = torch.device | str | int | None

# Samples are drawn on the CPU in this precision and then cast to the requested dtype.
_WORK_DTYPE = torch.float64


# --------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------


def _check_num_samples(num_samples: int) -> int:
    """Return ``num_samples`` as an ``int`` or raise ``ValueError`` if it is not positive."""
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples <= 0
    ):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return int(num_samples)


def _check_test_fraction(test_fraction: float) -> float:
    """Return ``test_fraction`` as a ``float`` or raise ``ValueError`` if not in (0, 1)."""
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, numbers.Real)
        or not 0.0 < float(test_fraction) < 1.0
    ):
        raise ValueError(
            f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}"
        )
    return float(test_fraction)


def _make_generator(seed: int | None) -> torch.Generator:
    """Create a private CPU generator; ``seed=None`` seeds it non-deterministically."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    else:
        generator.manual_seed(int(seed))
    return generator


def _resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """Return ``dtype`` or the default dtype, checking that it is a floating point type."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
    return dtype


def _finish(samples: Tensor, dtype: torch.dtype | None, device: Device) -> Tensor:
    """Cast freshly drawn float64 CPU samples to the requested dtype and device."""
    return samples.to(device=device, dtype=_resolve_dtype(dtype)).contiguous()


def _randn(n: int, generator: torch.Generator, *size: int) -> Tensor:
    return torch.randn(n, *size, generator=generator, dtype=_WORK_DTYPE)


def _rand(n: int, generator: torch.Generator, *size: int) -> Tensor:
    return torch.rand(n, *size, generator=generator, dtype=_WORK_DTYPE)


def _randint(high: int, n: int, generator: torch.Generator) -> Tensor:
    return torch.randint(high, (n,), generator=generator)


# --------------------------------------------------------------------------------------
# Toy densities
# --------------------------------------------------------------------------------------

#: Registry of the toy densities, keyed by name; every value has the signature
#: ``(num_samples, *, seed=0, dtype=None, device=None) -> Tensor`` of shape ``(n, 2)``.
TOY_DENSITIES: dict[str, Callable[..., Tensor]] = {}

_SAMPLER_ARGUMENTS = """
    Arguments:
        num_samples: Number of points to draw (a positive int).
        seed: Seed of the private random generator; ``None`` for a random seed.
        dtype: Floating point dtype of the result (default: ``torch.get_default_dtype()``).
        device: Device of the result (default: CPU).

    Returns:
        Tensor of shape ``(num_samples, 2)``.
"""


def _toy_sampler(draw: Callable[[int, torch.Generator], Tensor]) -> Callable[..., Tensor]:
    """Register ``draw(n, generator) -> (n, 2) float64 CPU tensor`` as a public sampler.

    The returned function (registered in :data:`TOY_DENSITIES` under ``draw``'s name)
    has the signature ``(num_samples, *, seed=0, dtype=None, device=None)``: it checks
    ``num_samples``, makes the private generator from ``seed``, calls ``draw`` and casts
    the result to ``dtype`` and ``device``, so each density is only its own math. Its
    docstring is ``draw``'s, with the shared Arguments / Returns block inserted before
    the ``Example:`` section.
    """

    def sampler(
        num_samples: int,
        *,
        seed: int | None = 0,
        dtype: torch.dtype | None = None,
        device: Device = None,
    ) -> Tensor:
        points = draw(_check_num_samples(num_samples), _make_generator(seed))
        return _finish(points, dtype, device)

    doc = draw.__doc__ or ""
    head, example = doc.split("    Example:", 1) if "    Example:" in doc else (doc, "")
    sampler.__doc__ = (
        head.rstrip() + "\n" + _SAMPLER_ARGUMENTS + ("\n    Example:" + example if example else "")
    )
    sampler.__name__ = sampler.__qualname__ = draw.__name__
    sampler.__module__ = draw.__module__
    TOY_DENSITIES[draw.__name__] = sampler
    return sampler


def _on_circles(
    n: int, g: torch.Generator, num_circles: int, spacing: float, noise: float
) -> Tensor:
    """Noisy points on concentric circles (the shared code of ``rings`` and ``circles``).

    The radius is ``spacing * k`` with ``k`` uniform on ``1..num_circles``, the angle is
    uniform, and isotropic Gaussian noise of standard deviation ``noise`` is added.
    """
    radius = spacing * (_randint(num_circles, n, g) + 1).to(_WORK_DTYPE)
    angle = 2.0 * math.pi * _rand(n, g)
    points = radius.unsqueeze(-1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return points + noise * _randn(n, g, 2)


@_toy_sampler
def two_moons(n: int, g: torch.Generator) -> Tensor:
    """Sample the "two moons" density: two interleaving noisy half circles.

    One moon is the upper half of the unit circle, the other is the lower half shifted
    right by one and down by half a unit; each sample picks a moon with probability 1/2,
    is perturbed with Gaussian noise (standard deviation 0.1) and is then rescaled by 2
    and centred, so the data lie roughly within ``[-3, 3] x [-2, 2]``.

    Example:
        >>> x = two_moons(500, seed=1)
        >>> x.shape
        torch.Size([500, 2])
        >>> bool(x.abs().max() < 4)
        True
    """
    t = math.pi * _rand(n, g)
    lower = _randint(2, n, g).bool()
    x = torch.where(lower, 1.0 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    points = torch.stack([x, y], dim=-1) + 0.1 * _randn(n, g, 2)
    return 2.0 * points - torch.tensor([1.0, 0.5], dtype=_WORK_DTYPE)


@_toy_sampler
def eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    """Sample an equal-weight mixture of eight Gaussians arranged on a circle.

    The component means sit at the eight compass directions on a circle of radius
    ``4 / sqrt(2) ~ 2.83``; each component is isotropic with standard deviation
    ``0.5 / sqrt(2) ~ 0.35``. The resulting ring of blobs is a classic test for mode
    coverage.

    Example:
        >>> x = eight_gaussians(800, seed=0)
        >>> x.shape
        torch.Size([800, 2])
        >>> radius = x.norm(dim=-1).mean().item()
        >>> 2.5 < radius < 3.2
        True
    """
    component = _randint(8, n, g).to(_WORK_DTYPE)
    angle = component * (2.0 * math.pi / 8.0)
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1)
    return (4.0 * centres + 0.5 * _randn(n, g, 2)) / math.sqrt(2.0)


@_toy_sampler
def checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Sample the uniform density on the dark squares of a 4x4 checkerboard.

    The board covers ``[-4, 4]^2`` and is split into sixteen 2x2 squares; the density is
    uniform on the eight squares of one colour and zero on the others, giving sharp edges
    and disconnected support.

    Example:
        >>> x = checkerboard(1000, seed=0)
        >>> x.shape
        torch.Size([1000, 2])
        >>> cell = torch.floor(x / 2)
        >>> bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())
        True
    """
    # Column index in {-2, ..., 1} and row index in {-2, ..., 1} with the same parity.
    column = _randint(4, n, g) - 2
    row = 2 * _randint(2, n, g) - 2 + column.remainder(2)
    cells = torch.stack([column, row], dim=-1).to(_WORK_DTYPE)
    return 2.0 * (cells + _rand(n, g, 2))


@_toy_sampler
def rings(n: int, g: torch.Generator) -> Tensor:
    """Sample four concentric noisy rings.

    The rings have radii 0.75, 1.5, 2.25 and 3 and equal probability; the angle is
    uniform and points are perturbed with Gaussian noise of standard deviation 0.08.

    Example:
        >>> x = rings(1000, seed=0)
        >>> x.shape
        torch.Size([1000, 2])
        >>> bool(x.norm(dim=-1).max() < 3.5)
        True
    """
    return _on_circles(n, g, num_circles=4, spacing=0.75, noise=0.08)


@_toy_sampler
def circles(n: int, g: torch.Generator) -> Tensor:
    """Sample two concentric noisy circles.

    The circles have radii 1.5 and 3 and equal probability; points are perturbed with
    Gaussian noise of standard deviation 0.24 (like scikit-learn's ``make_circles`` with
    ``factor=0.5, noise=0.08`` scaled by 3).

    Example:
        >>> x = circles(600, seed=0)
        >>> x.shape
        torch.Size([600, 2])
    """
    return _on_circles(n, g, num_circles=2, spacing=1.5, noise=0.24)


@_toy_sampler
def pinwheel(n: int, g: torch.Generator) -> Tensor:
    """Sample the five-armed pinwheel density.

    Each of five equally likely arms starts as an elongated Gaussian blob (radial standard
    deviation 0.3, tangential 0.1) centred at distance 1 from the origin, which is then
    rotated by the arm's base angle plus an amount that grows exponentially with the
    radial coordinate, bending the blobs into curved arms. The result is scaled by 2.

    Example:
        >>> x = pinwheel(500, seed=0)
        >>> x.shape
        torch.Size([500, 2])
    """
    num_arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    arm = _randint(num_arms, n, g).to(_WORK_DTYPE)
    features = _randn(n, g, 2) * torch.tensor([radial_std, tangential_std], dtype=_WORK_DTYPE)
    features[:, 0] += 1.0
    angle = arm * (2.0 * math.pi / num_arms) + rate * torch.exp(features[:, 0])
    cos, sin = torch.cos(angle), torch.sin(angle)
    x = cos * features[:, 0] - sin * features[:, 1]
    y = sin * features[:, 0] + cos * features[:, 1]
    return 2.0 * torch.stack([x, y], dim=-1)


@_toy_sampler
def two_spirals(n: int, g: torch.Generator) -> Tensor:
    """Sample two interleaved spiral arms, point-symmetric about the origin.

    Each arm is an Archimedean spiral that winds one and a half turns (540 degrees)
    outwards from the origin, with points spread more densely at larger radii; one arm is
    the reflection of the other through the origin. The arms are scaled by 1/3 and blurred
    with small uniform jitter and Gaussian noise (standard deviation 0.1).

    Example:
        >>> x = two_spirals(500, seed=0)
        >>> x.shape
        torch.Size([500, 2])
    """
    t = torch.sqrt(_rand(n, g)) * (3.0 * math.pi)
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=-1) + 0.5 * _rand(n, g, 2)
    sign = (2 * _randint(2, n, g) - 1).to(_WORK_DTYPE).unsqueeze(-1)
    return sign * arm / 3.0 + 0.1 * _randn(n, g, 2)


@_toy_sampler
def banana(n: int, g: torch.Generator) -> Tensor:
    """Sample a banana-shaped (curved Gaussian) data set.

    With ``z`` a standard normal pair, the samples are
    ``(z1, 0.5 * z2 + 0.3 * (z1**2 - 1))``: a unimodal density whose mass bends upwards
    along a parabola, a standard test for strongly correlated, non-Gaussian targets.
    This is toy *data*; the posterior *target* of the guide benchmarks,
    :func:`pyro_nf.infer.targets.twisted_gaussian` (once also called ``banana``), is
    another density: twist 1 and conditional standard deviation 1.

    Example:
        >>> x = banana(500, seed=0)
        >>> x.shape
        torch.Size([500, 2])
    """
    z = _randn(n, g, 2)
    return torch.stack([z[:, 0], 0.5 * z[:, 1] + 0.3 * (z[:, 0] ** 2 - 1.0)], dim=-1)


def toy_density(name: str, num_samples: int, **kwargs: object) -> Tensor:
    """Draw samples from the toy density registered under ``name`` in ``TOY_DENSITIES``.

    Arguments:
        name: One of the keys of :data:`TOY_DENSITIES`, e.g. ``"two_moons"``.
        num_samples: Number of points to draw (a positive int).
        **kwargs: Passed on to the sampler: ``seed``, ``dtype`` and ``device``.

    Returns:
        Tensor of shape ``(num_samples, 2)``.

    Raises:
        ValueError: If ``name`` is not a known density (the message lists the known names)
            or ``num_samples`` is not a positive int.

    Example:
        >>> x = toy_density("checkerboard", 100, seed=3, dtype=torch.float64)
        >>> x.shape, x.dtype
        (torch.Size([100, 2]), torch.float64)
    """
    try:
        sampler = TOY_DENSITIES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(TOY_DENSITIES))
        raise ValueError(f"unknown toy density {name!r}; known names are: {known}") from None
    return sampler(num_samples, **kwargs)


# --------------------------------------------------------------------------------------
# Splitting and real data
# --------------------------------------------------------------------------------------


def train_test_split(
    data: Tensor, test_fraction: float = 0.2, seed: int | None = 0
) -> tuple[Tensor, Tensor]:
    """Randomly split the rows of ``data`` into a training and a test set.

    The rows are shuffled with a private generator seeded by ``seed`` (the global random
    state is untouched); ``round(test_fraction * len(data))`` rows, but at least one and at
    most ``len(data) - 1``, go to the test set and the rest to the training set.

    Arguments:
        data: Tensor with at least two rows along its first dimension.
        test_fraction: Fraction of rows put in the test set, strictly between 0 and 1.
        seed: Seed of the shuffling generator; ``None`` for a random seed.

    Returns:
        ``(train, test)``: tensors of shapes ``(n - n_test, *data.shape[1:])`` and
        ``(n_test, *data.shape[1:])`` that together hold each row of ``data`` exactly once.

    Example:
        >>> data = torch.arange(10.0).reshape(5, 2)
        >>> train, test = train_test_split(data, test_fraction=0.4, seed=0)
        >>> train.shape, test.shape
        (torch.Size([3, 2]), torch.Size([2, 2]))
    """
    if not isinstance(data, Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() == 0 or data.shape[0] < 2:
        raise ValueError(
            f"data must have at least two rows to be split, got shape {tuple(data.shape)}"
        )
    fraction = _check_test_fraction(test_fraction)
    n = data.shape[0]
    n_test = min(max(round(fraction * n), 1), n - 1)
    permutation = torch.randperm(n, generator=_make_generator(seed)).to(data.device)
    return data[permutation[n_test:]], data[permutation[:n_test]]


def load_digits(
    binarize: bool = True,
    seed: int | None = 0,
    test_fraction: float = 0.2,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's 8x8 handwritten digits as flattened, [0, 1]-scaled images.

    The 1797 images ship with scikit-learn (no download). Pixel intensities (integers
    0..16) are divided by 16; with ``binarize=True`` pixels ``>= 0.5`` become 1 and the
    others 0, which suits Bernoulli likelihoods and discrete flows. The rows are then
    split at random with :func:`train_test_split`.

    Arguments:
        binarize: Whether to threshold the scaled pixels at 0.5.
        seed: Seed of the train/test split; ``None`` for a random split.
        test_fraction: Fraction of images put in the test set, strictly between 0 and 1.
        dtype: Floating point dtype of the result (default: ``torch.get_default_dtype()``).

    Returns:
        ``(train, test)``: tensors of shapes ``(n_train, 64)`` and ``(n_test, 64)`` with
        ``n_train + n_test == 1797`` (1438 and 359 for the default ``test_fraction``).

    Raises:
        ImportError: If scikit-learn is not installed.

    Example:
        >>> train, test = load_digits(seed=0)
        >>> train.shape, test.shape
        (torch.Size([1438, 64]), torch.Size([359, 64]))
        >>> sorted(train.unique().tolist())
        [0.0, 1.0]
    """
    fraction = _check_test_fraction(test_fraction)
    try:
        from sklearn import datasets as sklearn_datasets
    except ImportError as error:
        raise ImportError(
            "load_digits requires scikit-learn; install it with `pip install scikit-learn`"
        ) from error
    images = torch.as_tensor(sklearn_datasets.load_digits().data, dtype=_WORK_DTYPE) / 16.0
    images = images.reshape(images.shape[0], -1)
    if binarize:
        images = (images >= 0.5).to(_WORK_DTYPE)
    images = images.to(_resolve_dtype(dtype))
    return train_test_split(images, test_fraction=fraction, seed=seed)
