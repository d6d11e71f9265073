"""Smoke tests of the example scripts (their ``--quick`` mode) and of the docs build."""

from __future__ import annotations

import gzip
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import load_script

from pyro_nf.infer import temper_likelihood

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def load_example(name: str):
    return load_script(f"examples/{name}.py", f"example_{name}")


def run_quick(name: str, tmp_path: Path, *argv: str) -> dict:
    module = load_example(name)
    return module.main(["--quick", "--no-progress", "--output-dir", str(tmp_path), *argv])


def assert_files(result: dict) -> None:
    assert result["files"], "the example wrote no files"
    for path in result["files"]:
        assert Path(path).is_file() and Path(path).stat().st_size > 0, path
    assert (Path(result["output_dir"]) / "results.json").is_file()


def numbers(rows: list[dict]) -> list[float]:
    return [v for row in rows for v in row.values() if isinstance(v, float)]


# --------------------------------------------------------------------------------------
# vae.py
# --------------------------------------------------------------------------------------


def test_vae_quick_every_posterior(tmp_path):
    posteriors = ["diag", "iaf", "maf", "realnvp", "cnf"]
    result = run_quick("vae", tmp_path, "--posterior", *posteriors)
    trained = [row["posterior"] for row in result["rows"]]
    assert trained == posteriors
    assert all(math.isfinite(v) for v in numbers(result["rows"]))
    for row in result["rows"]:
        assert row["reload ELBO"] == pytest.approx(row["test ELBO"], rel=1e-5)
        # the importance-weighted bound is at least the ELBO on average
        assert row["test log p(x) K=8"] >= row["test ELBO"] - 0.5
    assert_files(result)


@pytest.mark.parametrize("prior", ["realnvp", "maf"])
def test_vae_quick_flow_prior(tmp_path, prior):
    result = run_quick("vae", tmp_path, "--posterior", "diag", "--prior", prior)
    assert [row["prior"] for row in result["rows"]] == [prior]
    assert all(math.isfinite(v) for v in numbers(result["rows"]))
    assert_files(result)


def write_idx(path: Path, images: torch.Tensor) -> None:
    count, rows, cols = images.shape
    payload = (
        struct.pack(">IIII", 2051, count, rows, cols) + images.to(torch.uint8).numpy().tobytes()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(payload)


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    generator = torch.Generator().manual_seed(0)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    for name, count in [("train-images-idx3-ubyte.gz", 6), ("t10k-images-idx3-ubyte.gz", 3)]:
        write_idx(raw / name, torch.randint(0, 256, (count, 28, 28), generator=generator))
    return tmp_path / "mnist"


def test_mnist_loader_reads_torchvision_layout(fake_mnist):
    vae = load_example("vae")
    train, test = vae.load_mnist(fake_mnist)
    assert train.shape == (6, 784) and test.shape == (3, 784)
    assert set(train.unique().tolist()) == {0.0, 1.0}
    grey_train, _ = vae.load_mnist(fake_mnist, binarize=False)
    assert float(grey_train.min()) >= 0.0 and float(grey_train.max()) <= 1.0
    assert torch.equal(train, (grey_train >= 0.5).to(train.dtype))


def test_mnist_loader_never_downloads(tmp_path):
    vae = load_example("vae")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        vae.load_mnist(tmp_path)


def test_mnist_loader_rejects_a_wrong_magic_number(tmp_path):
    vae = load_example("vae")
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 2049, 1, 2, 2) + bytes(4))
    with pytest.raises(ValueError, match="magic number 2051"):
        vae.read_idx_images(path)


def test_vae_quick_on_fake_mnist(tmp_path, fake_mnist):
    result = run_quick(
        "vae",
        tmp_path / "out",
        "--data",
        "mnist",
        "--data-dir",
        str(fake_mnist),
        "--posterior",
        "diag",
    )
    assert all(math.isfinite(v) for v in numbers(result["rows"]))
    assert_files(result)


# --------------------------------------------------------------------------------------
# density_estimation.py
# --------------------------------------------------------------------------------------


def test_density_estimation_quick(tmp_path):
    result = run_quick("density_estimation", tmp_path)
    assert [row["density"] for row in result["rows"]] == ["two_moons", "checkerboard"]
    assert "gaussian" in result["rows"][0] and "realnvp" in result["rows"][0]
    assert result["all_finite"]
    assert (tmp_path / "densities.png").is_file()
    assert_files(result)


@pytest.mark.parametrize("family", ["realnvp", "spline", "maf", "cnf"])
def test_density_estimation_base_option_reaches_every_flow(family, tmp_path):
    example = load_example("density_estimation")
    args = example.parse_args(["--quick", "--base", "student_t", "--output-dir", str(tmp_path)])
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    model, _ = example.make_model(family, data, args)
    assert model.base == "student_t" and model.base_df.shape == (2,)
    assert example.parse_args(["--quick"]).base == "normal"


def test_density_estimation_cnf_objective_reaches_fit(tmp_path, monkeypatch):
    example = load_example("density_estimation")
    calls = []
    real_fit = example.fit
    monkeypatch.setattr(example, "fit", lambda *a, **k: calls.append(k) or real_fit(*a, **k))
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    args = example.parse_args(["--quick", "--cnf-objective", "flow_matching"])
    example.make_model("cnf", data, args)
    example.make_model("maf", data, args)
    # The cnf by flow matching, for the quick run's 2 epochs at fit's learning rate for
    # it; every other family by maximum likelihood at the example's rate.
    assert [(c["objective"], c["epochs"], c["lr"]) for c in calls] == [
        ("flow_matching", 2, None),
        ("likelihood", 2, 3e-3),
    ]
    # The flow-matching field gets three hidden layers, the other families two.
    assert example.hidden_layers("cnf", args) == 3
    assert (
        example.hidden_layers("maf", args)
        == example.hidden_layers("cnf", example.parse_args([]))
        == 2
    )
    assert example.hidden_layers("cnf", example.parse_args(["--hidden-layers", "4"])) == 4
    options = example.training_options(
        "cnf", example.parse_args(["--cnf-objective", "flow_matching"])
    )
    assert (options["epochs"], options["lr"]) == (None, None)  # fit's defaults
    assert example.training_options("cnf", example.parse_args([]))["objective"] == "likelihood"


def test_density_estimation_quick_on_a_table(tmp_path):
    table = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "table.csv"
    path.write_text(
        "a,b,c\n" + "\n".join(",".join(f"{v:.5f}" for v in row) for row in table.tolist())
    )
    result = run_quick(
        "density_estimation",
        tmp_path / "out",
        "--data",
        str(path),
        "--families",
        "gaussian",
        "realnvp",
    )
    assert [row["density"] for row in result["rows"]] == ["table"]
    assert result["all_finite"]


def test_density_estimation_quick_streams_a_npy_table_through_lightning(tmp_path):
    pytest.importorskip("lightning")
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(600, 3, generator=generator) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 1.0]]
    )
    path = tmp_path / "table.npy"
    np.save(path, table.numpy())
    common = ["--data", str(path), "--families", "gaussian", "realnvp"]
    streamed = run_quick("density_estimation", tmp_path / "fit", *common)
    through_lightning = run_quick(
        "density_estimation", tmp_path / "lightning", *common, "--devices", "1"
    )
    for result in (streamed, through_lightning):
        assert [row["density"] for row in result["rows"]] == ["table"]
        assert result["all_finite"]
    # The same streamed data and Gaussian (closed form) in both runs.
    gaussian = streamed["rows"][0]["gaussian"]
    assert through_lightning["rows"][0]["gaussian"] == pytest.approx(gaussian, rel=1e-6)


def test_vae_quick_streams_a_npy_file_through_lightning(tmp_path):
    pytest.importorskip("lightning")
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(160, 64, generator=generator) < 0.3).float()
    path = tmp_path / "images.npy"
    np.save(path, images.numpy())
    for devices in ([], ["--devices", "1"]):
        output = tmp_path / f"out{len(devices)}"
        arguments = ["--data", str(path), "--posterior", "iaf", *devices]
        result = run_quick("vae", output, *arguments)
        assert [row["posterior"] for row in result["rows"]] == ["iaf"]
        assert all(math.isfinite(v) for v in numbers(result["rows"]))
        assert_files(result)


# --------------------------------------------------------------------------------------
# docs
# --------------------------------------------------------------------------------------


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "flows" / "index.html").is_file()


# --------------------------------------------------------------------------------------
# svi_guides.py and neutra_hmc.py
# --------------------------------------------------------------------------------------


def test_svi_guides_quick(tmp_path):
    result = run_quick("svi_guides", tmp_path, "--families", "iaf", "realnvp")
    guides = {row["guide"] for row in result["rows"]}
    assert {"AutoNormal", "AutoMultivariateNormal", "AutoFlow-iaf", "AutoFlow-realnvp"} == guides
    assert {row["model"] for row in result["rows"]} == {"banana", "funnel", "logistic"}
    for row in result["rows"]:
        assert math.isfinite(row["ELBO"]) and math.isfinite(row["k-hat"])
    for model in ("banana", "funnel", "logistic"):
        assert (tmp_path / f"pairs_{model}.png").is_file()
    assert_files(result)


@pytest.mark.parametrize(
    ("example", "argv", "expected"),
    [
        ("neutra_hmc", [], {1.0}),  # the NeuTra example's own default
        ("neutra_hmc", ["--final-multiplier", "0.125"], {0.125}),
        ("svi_guides", [], {0.125}),  # AutoFlow's default at this size
    ],
)
def test_examples_final_multiplier_reaches_the_iaf_guide(example, argv, expected):
    module = load_example(example)
    args = module.parse_args(argv)
    args.funnel_dim = 4
    guides = load_example("svi_guides")
    problem = guides.make_problem("funnel", args)
    guide = guides.make_guide("AutoFlow-iaf", problem.model, args)
    guide()
    multipliers = {
        layer.conditioner.output.weight_multiplier
        for layer in guide.flow.layers
        if hasattr(layer, "conditioner")
    }
    assert multipliers == expected
    # A family without MADE conditioners ignores the option instead of failing.
    guides.make_guide("AutoFlow-realnvp", problem.model, args)()


def test_svi_guides_anneal_tempers_the_first_steps(monkeypatch):
    """``--anneal 0.5`` trains the first half of the steps on the tempered likelihood,
    beta rising from ``--anneal-start``; the later steps on the model itself."""
    guides = load_example("svi_guides")
    betas: list[float] = []

    def recording_temper_likelihood(model, beta):  # the betas of the tempered steps
        tempered = temper_likelihood(model, beta)
        if tempered is not model:
            betas.append(beta)
        return tempered

    monkeypatch.setattr(guides, "temper_likelihood", recording_temper_likelihood)
    args = guides.parse_args(["--quick", "--anneal", "0.5", "--anneal-start", "0.2"])
    problem = guides.make_problem("banana", args)
    guides.train(guides.make_guide("AutoFlow-iaf", problem.model, args), problem, args, "iaf")
    assert args.steps == 5
    assert betas == pytest.approx([0.2, 0.2 + 0.8 / 2.5, 0.2 + 0.8 * 2 / 2.5])


def test_svi_guides_components_train_a_mixture_with_learned_weights():
    """``--components 2``: each flow guide is two flows whose weights MixtureELBO
    trains (they move from 1/2); the other guides are unchanged."""
    guides = load_example("svi_guides")
    args = guides.parse_args(["--quick", "--components", "2"])
    problem = guides.make_problem("banana", args)
    guide = guides.make_guide("AutoFlow-realnvp", problem.model, args)
    guides.train(guide, problem, args, "realnvp")
    assert guide.num_components == 2
    assert not torch.allclose(guide.get_mixture_weights().detach(), torch.full((2,), 0.5))
    assert type(guides.make_guide("AutoNormal", problem.model, args)).__name__ == "AutoNormal"
    with pytest.raises(SystemExit):
        guides.parse_args(["--components", "0"])


def test_neutra_hmc_quick(tmp_path):
    result = run_quick("neutra_hmc", tmp_path, "--flow", "realnvp")
    samplers = [row["sampler"] for row in result["rows"]]
    assert samplers[0] == "NUTS"
    assert result["all_finite"]
    assert (tmp_path / "neutra_funnel.png").is_file()
    assert_files(result)
