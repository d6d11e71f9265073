"""The maximum-likelihood fit helper (pyro_nf.fit) and the Pyro-native training path."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_nf
from pyro_nf import FitHistory, NonFiniteLossError, fit
from pyro_nf.infer import ArrayDataset, NpyBatches

SMALL = {"num_layers": 2, "hidden_dims": (16,)}


def shifted_data(n=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=generator) * 0.5 + 2.0


def state_of(flow):
    return {k: v.clone() for k, v in flow.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def mean_log_prob(flow, x, context=None):
    flow.eval()
    value = float(flow.log_prob(x, context).mean())
    flow.train()
    return value


def test_fit_improves_likelihood_and_records_history():
    flow = pyro_nf.realnvp(2, **SMALL)
    data = shifted_data(200)
    before = mean_log_prob(flow, data)
    history = fit(flow, data, epochs=8, batch_size=32, lr=1e-2, progress=False)
    assert isinstance(history, FitHistory)
    assert history.epochs_run == 8 and len(history.validation_log_likelihood) == 8
    assert history.validation_index.shape == (20,)
    assert mean_log_prob(flow, data) > before + 1.0
    assert history.train_log_likelihood[-1] > history.train_log_likelihood[0]


def test_fit_early_stopping_and_best_parameter_restore():
    torch.manual_seed(0)
    flow = pyro_nf.realnvp(2, num_layers=4, hidden_dims=(32, 32))
    data = shifted_data(60)
    history = fit(
        flow,
        data,
        epochs=300,
        batch_size=15,
        lr=1e-2,
        validation_fraction=0.25,
        patience=5,
        progress=False,
    )
    values = history.validation_log_likelihood
    assert history.stopped_early
    assert history.epochs_run == history.best_epoch + 5 + 1 < 300
    assert history.best_epoch == max(range(len(values)), key=values.__getitem__)
    assert history.best_validation_log_likelihood == values[history.best_epoch]
    assert values[-1] < history.best_validation_log_likelihood
    # The flow holds the best epoch's parameters, not the last epoch's.
    restored = mean_log_prob(flow, data[history.validation_index])
    assert restored == pytest.approx(history.best_validation_log_likelihood, abs=1e-5)


def test_fit_without_validation_runs_every_epoch_and_keeps_the_last_parameters():
    flow = pyro_nf.realnvp(2, **SMALL)
    history = fit(flow, shifted_data(40), epochs=3, batch_size=20, validation_fraction=0.0)
    assert history.epochs_run == 3 and history.validation_log_likelihood == []
    assert history.best_epoch == 2 and math.isnan(history.best_validation_log_likelihood)
    assert history.validation_index is None and not history.stopped_early


class PoisoningAdam(torch.optim.Adam):
    """Adam that sets a parameter to NaN after its ``poison_at``-th step (1-based)."""

    def __init__(self, flow, poison_at, steps_per_epoch):
        super().__init__(flow.parameters(), lr=1e-3)
        self.flow, self.poison_at, self.steps_per_epoch = flow, poison_at, steps_per_epoch
        self.count = 0
        self.epoch_end_states = []

    def step(self, closure=None):
        result = super().step(closure)
        self.count += 1
        if self.count % self.steps_per_epoch == 0:
            self.epoch_end_states.append(state_of(self.flow))
        if self.count == self.poison_at:
            with torch.no_grad():
                next(self.flow.parameters()).fill_(math.nan)
        return result


@pytest.mark.parametrize(
    "poison_at, epoch, step",
    [pytest.param(2, 0, 2, id="first-epoch"), pytest.param(6, 1, 2, id="second-epoch")],
)
def test_fit_non_finite_loss_restores_last_good_parameters_and_raises(poison_at, epoch, step):
    flow = pyro_nf.realnvp(2, **SMALL)
    initial = state_of(flow)
    # 40 points, no validation, batches of 10: 4 steps per epoch.
    optimizer = PoisoningAdam(flow, poison_at, steps_per_epoch=4)
    with pytest.raises(NonFiniteLossError, match=f"epoch {epoch}, step {step}") as info:
        fit(
            flow,
            shifted_data(40),
            epochs=5,
            batch_size=10,
            validation_fraction=0.0,
            optimizer=optimizer,
            progress=False,
        )
    error = info.value
    assert isinstance(error, FloatingPointError)
    assert (error.epoch, error.step) == (epoch, step)
    assert error.history.epochs_run == epoch
    assert all(torch.isfinite(p).all() for p in flow.parameters())
    expected = initial if epoch == 0 else optimizer.epoch_end_states[epoch - 1]
    assert same_state(state_of(flow), expected)


def test_fit_conditional_flow():
    flow = pyro_nf.realnvp(2, context_dim=1, **SMALL)
    context = torch.randn(100, 1)
    data = torch.randn(100, 2) * 0.3 + 2.0 * context
    before = mean_log_prob(flow, data, context)
    fit(flow, data, context, epochs=5, batch_size=25, lr=1e-2, progress=False)
    assert mean_log_prob(flow, data, context) > before


def test_fit_progress_bar_can_be_turned_off(capsys):
    fit(pyro_nf.realnvp(2, **SMALL), shifted_data(20), epochs=2, progress=False)
    assert capsys.readouterr().err == ""
    fit(pyro_nf.realnvp(2, **SMALL), shifted_data(20), epochs=2, progress=True)
    assert "fit" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        pytest.param({"data": torch.randn(10, 3)}, ValueError, r"\(N, 2\)", id="wrong-dim"),
        pytest.param({"data": torch.randn(10)}, ValueError, r"\(N, 2\)", id="one-dim-data"),
        pytest.param({"data": [[0.0, 1.0]]}, ValueError, r"\(N, 2\)", id="not-a-tensor"),
        pytest.param(
            {"data": torch.tensor([[0.0, math.nan]] * 4)}, ValueError, "non-finite", id="nan"
        ),
        pytest.param({"context": torch.randn(10, 1)}, ValueError, "unconditional", id="context"),
        pytest.param({"validation_fraction": 1.0}, ValueError, "validation_fraction", id="frac"),
        pytest.param({"epochs": 0}, ValueError, "epochs", id="epochs"),
        pytest.param({"batch_size": 2.5}, TypeError, "batch_size", id="batch-size"),
        pytest.param({"batch_size": np.int64(4)}, None, None, id="numpy-batch-size"),
        pytest.param({"patience": 0}, ValueError, "patience", id="patience"),
        pytest.param({"lr": -1.0}, ValueError, "lr", id="lr"),
        pytest.param({"optimizer": "adam"}, TypeError, "optimizer", id="optimizer"),
        pytest.param(
            {"data": torch.randn(1, 2), "validation_fraction": 0.5},
            ValueError,
            "no training data",
            id="too-few-points",
        ),
    ],
)
def test_fit_validates_inputs_before_training(arguments, error, match):
    flow = pyro_nf.realnvp(2, **SMALL)
    initial = state_of(flow)
    kwargs = {"data": torch.randn(10, 2), "progress": False, **arguments}
    data = kwargs.pop("data")
    if error is None:  # accepted: NumPy integers are integers
        fit(flow, data, **{**kwargs, "epochs": 1})
        return
    with pytest.raises(error, match=match):
        fit(flow, data, **kwargs)
    assert same_state(state_of(flow), initial)


@pytest.mark.parametrize(
    "context, match",
    [
        pytest.param(None, r"conditional \(context_dim=3\)", id="missing"),
        pytest.param(torch.randn(10, 2), "last dimension 3", id="wrong-width"),
        pytest.param(torch.randn(9, 3), r"\(10, 3\)", id="wrong-length"),
    ],
)
def test_fit_validates_context_of_conditional_flow(context, match):
    flow = pyro_nf.realnvp(2, context_dim=3, **SMALL)
    with pytest.raises(ValueError, match=match):
        fit(flow, torch.randn(10, 2), context, progress=False)


def test_fit_rejects_a_bare_transform():
    with pytest.raises(TypeError, match="pyro_nf.Flow"):
        fit(pyro_nf.Coupling([True, False]), torch.randn(10, 2), progress=False)


def test_pyro_native_maximum_likelihood_with_empty_guide():
    """The documented alternative to fit: pyro.module, obs= under a plate, SVI."""
    flow = pyro_nf.realnvp(2, **SMALL)
    data = shifted_data(128)

    def model(data):
        pyro.module("flow", flow)
        with pyro.plate("data", data.shape[0], subsample_size=32) as index:
            pyro.sample("x", flow(), obs=data[index])

    def guide(data):
        pass

    before = mean_log_prob(flow, data)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(60):
        svi.step(data)
    assert mean_log_prob(flow, data) > before + 1.0
    assert isinstance(flow(), dist.TransformedDistribution)


# --------------------------------------------------------------------------------------
# Data sources: datasets, memory maps, streams and ready loaders
# --------------------------------------------------------------------------------------


def fitted_state(data, context=None, context_dim=0, **kwargs):
    torch.manual_seed(0)  # the same initial parameters for every data source
    flow = pyro_nf.realnvp(2, context_dim=context_dim, **SMALL)
    options = {"epochs": 3, "batch_size": 16, "lr": 1e-2, "progress": False, **kwargs}
    history = fit(flow, data, context, **options)
    return state_of(flow), history


class RowDataset(torch.utils.data.Dataset):
    """A plain map-style dataset, one row (or one (x, context) pair) per item."""

    def __init__(self, data, context=None):
        self.data, self.context = data, context

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i] if self.context is None else (self.data[i], self.context[i])


def test_fit_on_a_dataset_equals_fit_on_the_tensor(tmp_path):
    data = shifted_data(70)
    reference, reference_history = fitted_state(data)
    path = tmp_path / "rows.npy"
    np.save(path, data.numpy())
    sources = {
        "rows": RowDataset(data),
        "tensor-dataset": torch.utils.data.TensorDataset(data),
        "memmap": ArrayDataset(np.load(path, mmap_mode="r")),
        "npy-path": ArrayDataset(path),
    }
    for name, source in sources.items():
        state, history = fitted_state(source)
        assert same_state(state, reference), name
        assert torch.equal(history.validation_index, reference_history.validation_index)
        assert history.validation_log_likelihood == reference_history.validation_log_likelihood


def test_fit_on_a_conditional_dataset_equals_fit_on_the_tensors():
    context = torch.randn(50, 1, generator=torch.Generator().manual_seed(1))
    data = shifted_data(50) + context
    reference, _ = fitted_state(data, context, context_dim=1)
    state, _ = fitted_state(RowDataset(data, context), context_dim=1)
    assert same_state(state, reference)
    state, _ = fitted_state(ArrayDataset(data, context), context_dim=1)
    assert same_state(state, reference)


def test_fit_with_ready_loaders_uses_their_batches():
    data = shifted_data(64)
    train, validation = data[:48], data[48:]
    # A fixed order of minibatches: fit must take exactly these steps, in this order.
    batches = list(train.split(16))
    torch.manual_seed(0)
    flow = pyro_nf.realnvp(2, **SMALL)
    manual = pyro_nf.realnvp(2, **SMALL)
    manual.load_state_dict(flow.state_dict())
    history = fit(flow, batches, validation_data=validation, epochs=2, lr=1e-2, progress=False)
    optimizer = torch.optim.Adam(manual.parameters(), lr=1e-2)
    for _ in range(2):
        for batch in batches:
            optimizer.zero_grad()
            (-manual.log_prob(batch).mean()).backward()
            optimizer.step()
    # fit keeps the best epoch's parameters: compare with the epoch it kept.
    assert history.epochs_run == 2 and history.validation_index is None
    if history.best_epoch == 1:
        assert same_state(state_of(flow), state_of(manual))
    expected = mean_log_prob(manual, validation)
    assert history.validation_log_likelihood[-1] == pytest.approx(expected, abs=1e-5)


def test_fit_streams_a_npy_file(tmp_path):
    data = shifted_data(300)
    path = tmp_path / "rows.npy"
    np.save(path, data.numpy())
    torch.manual_seed(0)
    flow = pyro_nf.realnvp(2, **SMALL)
    before = mean_log_prob(flow, data)
    train = NpyBatches(path, batch_size=32, rows=(0, 240), block_rows=64, seed=0)
    validation = NpyBatches(path, batch_size=64, rows=(240, 300), shuffle=False)
    history = fit(flow, train, validation_data=validation, epochs=4, lr=1e-2, progress=False)
    assert history.epochs_run == 4 and len(history.validation_log_likelihood) == 4
    assert mean_log_prob(flow, data) > before + 1.0


def test_npy_batches_visit_every_row_once_per_pass_in_a_new_order(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(200, dtype=np.float32).reshape(100, 2))
    stream = NpyBatches(path, batch_size=8, block_rows=32, seed=3)
    passes = [torch.cat(list(stream))[:, 0] for _ in range(2)]
    for rows in passes:
        assert sorted(rows.tolist()) == list(range(0, 200, 2))
    assert not torch.equal(passes[0], passes[1])
    assert len(stream) == 13


def test_fit_on_an_iterable_dataset_of_rows():
    data = shifted_data(64)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    torch.manual_seed(0)
    flow = pyro_nf.realnvp(2, **SMALL)
    before = mean_log_prob(flow, data)
    history = fit(flow, Rows(), epochs=6, batch_size=16, lr=1e-2, progress=False)
    assert history.epochs_run == 6 and history.validation_log_likelihood == []
    assert mean_log_prob(flow, data) > before


def test_fit_stops_on_a_bad_row_in_a_stream_and_keeps_the_last_good_parameters():
    good = list(shifted_data(32).split(16))
    bad = torch.tensor([[0.0, math.nan]] * 16)
    flow = pyro_nf.realnvp(2, **SMALL)

    class FailsInSecondPass:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(good if self.passes == 1 else [good[0], bad])

    with pytest.raises(ValueError, match="non-finite"):
        fit(flow, FailsInSecondPass(), epochs=3, lr=1e-2, progress=False)
    assert all(torch.isfinite(p).all() for p in flow.parameters())


@pytest.mark.parametrize(
    "data, context, match",
    [
        pytest.param("rows.npy", None, "expected data", id="string"),
        pytest.param(
            torch.utils.data.TensorDataset(torch.randn(8, 2)),
            torch.randn(8, 1),
            "pairs",
            id="context-with-dataset",
        ),
        pytest.param([torch.randn(4, 3)], None, r"\(N, 2\)", id="wrong-batch-width"),
    ],
)
def test_fit_rejects_bad_data_sources(data, context, match):
    flow = pyro_nf.realnvp(2, **SMALL)
    initial = state_of(flow)
    with pytest.raises(ValueError, match=match):
        fit(flow, data, context, progress=False)
    assert same_state(state_of(flow), initial)


def test_fit_leaves_the_global_rng_untouched():
    flow, data = pyro_nf.realnvp(2, **SMALL), torch.utils.data.TensorDataset(shifted_data(40))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(flow, data, epochs=2, batch_size=8, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("rank", [0, 1])
def test_npy_batches_give_each_process_its_part_of_every_global_batch(tmp_path, monkeypatch, rank):
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(22, dtype=np.float32).reshape(11, 2))
    monkeypatch.setattr(NpyBatches, "_process", staticmethod(lambda: (rank, 2)))
    parts = list(NpyBatches(path, batch_size=4, shuffle=False))
    # Global batches of rows 0-3, 4-7, 8-10: halves of 2, 2 and (2 | 1) rows.
    expected = [[0, 1], [4, 5], [8, 9]] if rank == 0 else [[2, 3], [6, 7], [10]]
    assert [(p[:, 0] / 2).int().tolist() for p in parts] == expected
    monkeypatch.setattr(NpyBatches, "_process", staticmethod(lambda: (rank, 4)))
    # Three processes' worth of rows in the last global batch, four processes: skipped.
    assert len(list(NpyBatches(path, batch_size=4, shuffle=False))) == 2


@pytest.mark.parametrize("family", ["realnvp", "maf"])
def test_fit_compiled_takes_the_steps_of_eager(family):
    """``compile=`` runs each minibatch's loss compiled; the training is the same (the
    ``aot_eager`` backend: dynamo's capture and AOT autograd, without minutes of code
    generation). Float32 round-off of the captured graph is the only difference."""
    torch._dynamo.reset()
    data = shifted_data(n=90)
    flows = {}
    for mode in (False, "aot_eager"):
        torch.manual_seed(0)
        flows[mode] = pyro_nf.flows.flow_builder(family)(2, **SMALL)
        fit(flows[mode], data, epochs=3, batch_size=40, lr=1e-2, progress=False, compile=mode)
    # The compiled fit did go through dynamo (at least one graph was captured).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager, compiled = (state_of(flows[mode]) for mode in (False, "aot_eager"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_fit_compile_argument_is_checked_before_training():
    flow = pyro_nf.realnvp(2, **SMALL)
    before = state_of(flow)
    with pytest.raises(TypeError, match="compile"):
        fit(flow, shifted_data(), epochs=1, progress=False, compile=3)
    assert same_state(before, state_of(flow))
