"""Tests for the toy densities, the train/test split and the digits loader."""

import doctest
import inspect

import pytest
import torch

import pyro_nf.datasets as datasets_module
from pyro_nf.datasets import (
    TOY_DENSITIES,
    load_digits,
    toy_density,
    train_test_split,
)

NAMES = sorted(TOY_DENSITIES)
REQUIRED = ["two_moons", "eight_gaussians", "checkerboard", "rings", "pinwheel", "two_spirals"]
N = 1000


def test_registry_contains_required_densities() -> None:
    for name in REQUIRED:
        assert name in TOY_DENSITIES
        assert getattr(datasets_module, name) is TOY_DENSITIES[name]


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
@pytest.mark.parametrize("n", [1, 7, N], ids=lambda n: f"n={n}")
def test_shape_and_finite(name: str, n: int) -> None:
    x = toy_density(name, n)
    assert x.shape == (n, 2)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_default_dtype(name: str) -> None:
    assert TOY_DENSITIES[name](10).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dtype_honoured(name: str, dtype: torch.dtype) -> None:
    x = TOY_DENSITIES[name](50, dtype=dtype)
    assert x.dtype == dtype
    assert x.device == torch.device("cpu")


def test_device_argument() -> None:
    x = toy_density("pinwheel", 20, device="cpu", dtype=torch.float64)
    assert x.device == torch.device("cpu")
    assert torch.equal(
        x, toy_density("pinwheel", 20, device=torch.device("cpu"), dtype=torch.float64)
    )


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_dtypes_agree(name: str) -> None:
    x32 = TOY_DENSITIES[name](50, seed=4, dtype=torch.float32)
    x64 = TOY_DENSITIES[name](50, seed=4, dtype=torch.float64)
    assert torch.equal(x32, x64.float())


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_same_seed_reproducible(name: str) -> None:
    assert torch.equal(toy_density(name, 200, seed=123), toy_density(name, 200, seed=123))


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_different_seed_differs(name: str) -> None:
    assert not torch.equal(toy_density(name, 200, seed=1), toy_density(name, 200, seed=2))


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_seed_none_is_random(name: str) -> None:
    x = toy_density(name, 200, seed=None)
    assert x.shape == (200, 2)
    assert not torch.equal(x, toy_density(name, 200, seed=None))


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
@pytest.mark.parametrize("seed", [0, None], ids=["seed=0", "seed=None"])
def test_global_rng_untouched(name: str, seed: int | None) -> None:
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    toy_density(name, 100, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_bounded(name: str, seed: int) -> None:
    x = toy_density(name, N, seed=seed)
    assert x.abs().max() <= 6.0
    # Roughly standardized: not collapsed to a point and centred near the origin.
    assert (x.std(dim=0) > 0.3).all()
    assert (x.mean(dim=0).abs() < 1.0).all()


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="two_moons") as info:
        toy_density("no_such_density", 10)
    assert "no_such_density" in str(info.value)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True, None], ids=repr)
def test_bad_num_samples_raises(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        TOY_DENSITIES[name](bad)


def test_bad_dtype_raises() -> None:
    with pytest.raises(ValueError, match="dtype"):
        toy_density("rings", 10, dtype=torch.int64)


@pytest.mark.parametrize("name", NAMES, ids=NAMES)
def test_every_sampler_has_the_shared_signature_and_arguments_block(name: str) -> None:
    sampler = TOY_DENSITIES[name]
    assert sampler.__name__ == name and getattr(datasets_module, name) is sampler
    assert list(inspect.signature(sampler).parameters) == ["num_samples", "seed", "dtype", "device"]
    assert "Arguments:" in sampler.__doc__ and "Example:" in sampler.__doc__


def test_seed_must_be_keyword() -> None:
    with pytest.raises(TypeError):
        TOY_DENSITIES["rings"](10, 0)


# --------------------------------------------------------------------------------------
# train_test_split
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"),
    [(100, 0.2, 20), (10, 0.25, 2), (5, 0.4, 2), (2, 0.01, 1), (2, 0.99, 1)],
)
def test_split_sizes(n: int, fraction: float, n_test: int) -> None:
    data = torch.arange(float(n)).unsqueeze(-1).expand(n, 3)
    train, test = train_test_split(data, test_fraction=fraction)
    assert test.shape == (n_test, 3)
    assert train.shape == (n - n_test, 3)


def test_split_disjoint_and_complete() -> None:
    data = torch.arange(100.0).reshape(50, 2)
    train, test = train_test_split(data, test_fraction=0.3, seed=5)
    train_rows = {tuple(row) for row in train.tolist()}
    test_rows = {tuple(row) for row in test.tolist()}
    assert train_rows.isdisjoint(test_rows)
    assert train_rows | test_rows == {tuple(row) for row in data.tolist()}


def test_split_seeded() -> None:
    data = torch.arange(200.0)
    first = train_test_split(data, seed=3)
    again = train_test_split(data, seed=3)
    other = train_test_split(data, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_split_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    train_test_split(torch.randn(30, 2, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5], ids=repr)
def test_split_bad_fraction_raises(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(torch.zeros(10, 2), test_fraction=fraction)


def test_split_too_few_rows_raises() -> None:
    with pytest.raises(ValueError):
        train_test_split(torch.zeros(1, 2))


# --------------------------------------------------------------------------------------
# load_digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_binary() -> tuple[torch.Tensor, torch.Tensor]:
    pytest.importorskip("sklearn")
    return load_digits()


def test_digits_shapes(digits_binary: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = digits_binary
    assert train.shape[1] == test.shape[1] == 64
    assert train.shape[0] + test.shape[0] == 1797
    assert test.shape[0] == round(0.2 * 1797)
    assert train.dtype == test.dtype == torch.get_default_dtype()


def test_digits_binarized(digits_binary: tuple[torch.Tensor, torch.Tensor]) -> None:
    for part in digits_binary:
        assert set(part.unique().tolist()) == {0.0, 1.0}


def test_digits_continuous_and_dtype() -> None:
    pytest.importorskip("sklearn")
    train, test = load_digits(binarize=False, test_fraction=0.5, seed=1, dtype=torch.float64)
    assert train.dtype == test.dtype == torch.float64
    assert train.shape[0] + test.shape[0] == 1797
    for part in (train, test):
        assert part.min() >= 0.0 and part.max() <= 1.0
    assert not set(train.unique().tolist()) <= {0.0, 1.0}


def test_digits_split_seeded() -> None:
    pytest.importorskip("sklearn")
    assert torch.equal(load_digits(seed=7)[1], load_digits(seed=7)[1])
    assert not torch.equal(load_digits(seed=7)[1], load_digits(seed=8)[1])


def test_digits_bad_fraction_raises() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_digits_missing_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


# --------------------------------------------------------------------------------------
# Docstring examples
# --------------------------------------------------------------------------------------


def test_docstring_examples_run() -> None:
    pytest.importorskip("sklearn")
    result = doctest.testmod(datasets_module, extraglobs={"torch": torch}, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
