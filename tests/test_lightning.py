"""pyro_nf.lightning: the Lightning modules, and data-parallel training checked against one process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from torch import nn  # noqa: E402

import pyro_nf  # noqa: E402
from pyro_nf.lightning import FlowDensityModule, SVIModule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import lightning_ddp_worker as worker  # noqa: E402

# Float32 arithmetic summed in another order (two halves all-reduced vs one batch) over
# six Adam steps: observed differences are ~3e-8; 1e-5 leaves room for other CPUs'
# kernels while staying far below the parameters' movement (checked below, > 1e-2).
ATOL = 1e-5


def trainer(**options):
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**defaults, **options})


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_import_pyro_nf_does_not_import_lightning():
    code = "import sys, pyro_nf; print(any(m.split('.')[0] in {'lightning', 'pytorch_lightning'} for m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# Two processes (gloo) against one
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    output = tmp_path_factory.mktemp("ddp")
    # The workers import the same pyro_nf as this process (this checkout's).
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "lightning_ddp_worker.py"), str(output)],
        capture_output=True,
        text=True,
        timeout=600,  # about 30 s of CPU; a loaded shared machine can stretch it far
        env={**os.environ, "PYTHONPATH": path},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output


@pytest.mark.parametrize("kind", ["density", "svi"])
def test_two_processes_match_one_and_resume_exactly(ddp_runs, kind):
    initial = worker.initial_state(kind)
    single = worker.train(kind, devices=1).state_dict()
    moved = max_difference(single, initial)
    assert moved > 1e-2, "training must move the parameters well beyond the tolerance"
    ddp = torch.load(ddp_runs / f"{kind}-ddp.pt")
    resumed = torch.load(ddp_runs / f"{kind}-ddp-resumed.pt")
    assert max_difference(ddp, single) < ATOL
    assert max_difference(resumed, single) < ATOL


def test_single_process_resume_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = worker.train("svi", devices=1).state_dict()
    worker.train("svi", devices=1, epochs=1, checkpoint_dir=tmp_path)
    resumed = worker.train("svi", devices=1, resume=tmp_path / "last.ckpt").state_dict()
    assert max_difference(resumed, uninterrupted) == 0.0


# --------------------------------------------------------------------------------------
# FlowDensityModule
# --------------------------------------------------------------------------------------


def test_flow_density_module_conditional_trains_and_validates():
    torch.manual_seed(0)
    context = torch.randn(128, 1)
    data = torch.randn(128, 2) * 0.3 + 2.0 * context
    pairs = torch.utils.data.TensorDataset(data, context)
    flow = pyro_nf.realnvp(2, context_dim=1, num_layers=2, hidden_dims=(16,))
    with torch.no_grad():
        before = float(flow.log_prob(data, context).mean())
    module = FlowDensityModule(flow, lr=1e-2)
    run = trainer(max_epochs=5)
    loader = torch.utils.data.DataLoader(pairs, batch_size=32, shuffle=True)
    run.fit(module, loader, torch.utils.data.DataLoader(pairs, batch_size=64))
    validation = float(run.callback_metrics["validation_log_likelihood"])
    flow.eval()
    with torch.no_grad():
        after = float(flow.log_prob(data, context).mean())
    assert after > before + 0.5
    assert validation == pytest.approx(after, abs=1e-4)
    assert module.non_finite is None


def test_flow_density_module_stops_on_non_finite_loss_with_last_good_parameters():
    flow = pyro_nf.realnvp(2, num_layers=2, hidden_dims=(8,))
    good = torch.randn(32, 2)
    # A sane first epoch; the second epoch's second minibatch poisons a parameter
    # through the optimizer (the loss after it is NaN).
    states = []

    class Poisoning(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            states.append({k: v.clone() for k, v in module.state_dict().items()})

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                with torch.no_grad():
                    next(module.parameters()).fill_(math.nan)

    module = FlowDensityModule(flow, lr=1e-2)
    run = trainer(max_epochs=4, callbacks=[Poisoning()])
    run.fit(module, torch.utils.data.DataLoader(good, batch_size=8))
    assert module.non_finite is not None and "epoch 1, step 1" in module.non_finite
    assert run.current_epoch < 3
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert max_difference(module.state_dict(), states[0]) == 0.0


def test_flow_density_module_trains_by_flow_matching():
    # The same minibatches and the same global random state: the module's steps are
    # plain Adam steps on flow_matching_loss.
    data = torch.randn(64, 2) * 0.5 + 1.0
    batches = list(data.split(16))
    flows = []
    for _ in range(2):
        torch.manual_seed(3)
        flows.append(pyro_nf.cnf(2, hidden_dims=(8,), rtol=1e-4, atol=1e-4))
    initial = {k: v.clone() for k, v in flows[0].state_dict().items()}
    torch.manual_seed(7)
    optimizer = torch.optim.Adam(flows[0].parameters(), lr=1e-2)
    for batch in batches:
        optimizer.zero_grad()
        pyro_nf.infer.flow_matching_loss(flows[0], batch).backward()
        optimizer.step()
    module = FlowDensityModule(flows[1], lr=1e-2, objective="flow_matching")
    torch.manual_seed(7)
    run = trainer(max_epochs=1)
    # A loader with its own generator: a loader without one draws its base seed from
    # the global random state, which would shift the module's draws.
    loader = torch.utils.data.DataLoader(batches, batch_size=None, generator=torch.Generator())
    run.fit(module, loader)
    assert "train_flow_matching_loss" in run.callback_metrics
    assert max_difference(flows[0].state_dict(), flows[1].state_dict()) < ATOL
    assert max_difference(flows[1].state_dict(), initial) > 1e-3  # the steps moved it


def test_flow_density_module_refuses_flow_matching_for_a_discrete_flow():
    with pytest.raises(ValueError, match="one ContinuousFlow block"):
        FlowDensityModule(pyro_nf.realnvp(2, hidden_dims=(8,)), objective="flow_matching")
    with pytest.raises(ValueError, match="objective must be one of"):
        FlowDensityModule(pyro_nf.realnvp(2, hidden_dims=(8,)), objective="elbo")


def test_flow_density_module_rejects_a_bare_transform():
    with pytest.raises(TypeError, match="pyro_nf.Flow"):
        FlowDensityModule(pyro_nf.Coupling([True, False]))


# --------------------------------------------------------------------------------------
# SVIModule
# --------------------------------------------------------------------------------------


def local_latent_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)


def test_svi_module_trains_an_amortized_flow_guide_after_a_warm_up():
    pyro.clear_param_store()
    torch.manual_seed(0)
    data = torch.randn(96, 2) + 1.0
    flow = pyro_nf.realnvp(2, context_dim=4, num_layers=2, hidden_dims=(8,))
    guide = pyro_nf.AmortizedFlowGuide(local_latent_model, nn.Linear(2, 4), flow, site="z")
    module = SVIModule(local_latent_model, guide, lr=1e-2)
    loader = torch.utils.data.DataLoader(data, batch_size=32)

    @torch.no_grad()
    def elbo():  # on minibatches of the size the guide was set up with
        loss = pyro.infer.Trace_ELBO(num_particles=64)
        return -sum(loss.loss(local_latent_model, guide, batch) for batch in data.split(32))

    module.example_batch = data[:32]
    module.setup("fit")  # the warm-up, so that the ELBO before training exists
    before = elbo()
    run = trainer(max_epochs=8)
    run.fit(module, loader, loader)
    after = elbo()
    # The ELBO of 96 points rises by tens of nats in 24 steps at lr 1e-2; 10 is well
    # above its Monte Carlo error with 64 particles (about 1 nat).
    assert after > before + 10.0, (before, after)
    assert math.isfinite(float(run.callback_metrics["validation_elbo"]))


def test_svi_module_trains_learned_mixture_weights_with_mixture_elbo():
    """A minibatched model, a guide of two flows with learned weights and MixtureELBO:
    Lightning's steps train every parameter, the weights included."""

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", 64, subsample=torch.arange(len(x))):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    pyro.clear_param_store()
    torch.manual_seed(0)
    data = torch.randn(64, 2) + 3.0
    guide = pyro_nf.AutoFlow(
        model, flow="realnvp", components=2, mixture_weights="learned", hidden_dims=(8,)
    )
    module = SVIModule(model, guide, loss=pyro_nf.infer.MixtureELBO(4), lr=1e-2)
    module.example_batch = data[:16]
    module.setup("fit")
    before = {name: value.detach().clone() for name, value in guide.named_parameters()}
    trainer(max_steps=4).fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    frozen = [n for n, v in guide.named_parameters() if torch.equal(v.detach(), before[n])]
    assert not frozen, frozen
    assert "mixture_logits" in before


def test_svi_module_registers_the_module_behind_bound_methods():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Linear(2, 2)

        def model(self, x):
            local_latent_model(x)

        def guide(self, x):
            pyro.module("tiny", self)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(self.loc(x), 0.5).to_event(1))

    pyro.clear_param_store()
    tiny = Tiny()
    module = SVIModule(tiny.model, tiny.guide, example_batch=torch.zeros(4, 2))
    assert {id(p) for p in tiny.parameters()} <= {id(p) for p in module.parameters()}
    trainer(max_steps=2).fit(module, torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4))


def test_svi_module_refuses_parameters_outside_its_modules():
    def guide(x):
        loc = pyro.param("outside_loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))

    pyro.clear_param_store()
    module = SVIModule(local_latent_model, guide)
    with pytest.raises(TypeError, match="outside_loc"):
        trainer(max_steps=1).fit(
            module, torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4)
        )


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        pytest.param({"model": 1}, TypeError, "callables", id="model"),
        pytest.param({"loss": "elbo"}, TypeError, "differentiable_loss", id="loss"),
        pytest.param({"lr": 0.0}, ValueError, "lr", id="lr"),
        pytest.param({"optimizer": "adam"}, TypeError, "optimizer", id="optimizer"),
    ],
)
def test_svi_module_validates_arguments(arguments, error, match):
    kwargs = {"model": local_latent_model, "guide": local_latent_model, **arguments}
    with pytest.raises(error, match=match):
        SVIModule(**kwargs)
