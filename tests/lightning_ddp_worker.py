"""Data-parallel training runs for tests/test_lightning.py, in two spawned processes.

``python tests/lightning_ddp_worker.py OUTPUT_DIR`` starts two processes (gloo backend,
CPU) which train each problem of :func:`problems` with ``Trainer(strategy="ddp",
devices=2)`` on their halves of the same global minibatches, once uninterrupted and
once stopped after the first epoch and resumed from its checkpoint; rank 0 writes the
final parameters to ``OUTPUT_DIR/{problem}-{run}.pt``. The single-process reference is
trained by the test itself with :func:`train` and ``devices=1``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import lightning.pytorch as pl
import pyro
import pyro.distributions as dist
import torch

import pyro_nf
from pyro_nf.lightning import FlowDensityModule, SVIModule

STEPS_PER_EPOCH = 3
EPOCHS = 2
GLOBAL_BATCH = 16


def global_batches(kind: str) -> list[tuple[torch.Tensor, ...]]:
    """The same global minibatches for every run: (x,) or (x, y) tuples."""
    generator = torch.Generator().manual_seed(1)
    count = STEPS_PER_EPOCH * GLOBAL_BATCH
    x = torch.randn(count, 2, generator=generator)
    if kind == "density":
        return [(b,) for b in (x * 0.5 + 1.0).split(GLOBAL_BATCH)]
    y = x @ torch.tensor([1.5, -0.5]) + 0.3 + 0.5 * torch.randn(count, generator=generator)
    return list(zip(x.split(GLOBAL_BATCH), y.split(GLOBAL_BATCH), strict=True))


def regression_model(x: torch.Tensor, y: torch.Tensor) -> None:
    """Bayesian linear regression with global latents; the plate scales to 48 points."""
    weight = pyro.sample("weight", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 1.0))
    with pyro.plate("data", STEPS_PER_EPOCH * GLOBAL_BATCH, subsample=torch.arange(len(x))):
        pyro.sample("y", dist.Normal(x @ weight + bias, 0.5), obs=y)


def make_module(kind: str) -> pl.LightningModule:
    pl.seed_everything(0, verbose=False)
    pyro.clear_param_store()
    if kind == "density":
        flow = pyro_nf.realnvp(2, num_layers=2, hidden_dims=(16,))
        return FlowDensityModule(flow, lr=1e-2)
    guide = pyro_nf.AutoFlow(regression_model, flow="iaf", num_layers=2, hidden_dims=(8,))
    return SVIModule(regression_model, guide, lr=1e-2)


def initial_state(kind: str) -> dict[str, torch.Tensor]:
    """The parameters a run starts from (after the SVI guide's warm-up, drawn alike)."""
    module = make_module(kind)
    if isinstance(module, SVIModule):
        module.example_batch = next(iter(loader(global_batches(kind), 0, 1)))
        module.setup("fit")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def loader(batches: list[tuple[torch.Tensor, ...]], rank: int, world: int):
    """This process's part of each global minibatch, in order, one epoch per pass."""
    parts = [tuple(t.tensor_split(world)[rank] for t in batch) for batch in batches]
    parts = [p[0] if len(p) == 1 else p for p in parts]
    return torch.utils.data.DataLoader(parts, batch_size=None, shuffle=False)


def train(
    kind: str,
    devices: int,
    rank: int = 0,
    epochs: int = EPOCHS,
    checkpoint_dir: Path | None = None,
    resume: Path | None = None,
    module: pl.LightningModule | None = None,
) -> pl.LightningModule:
    module = module if module is not None else make_module(kind)
    callbacks = []
    if checkpoint_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_last=True))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    batches = global_batches(kind)
    trainer.fit(module, train_dataloaders=loader(batches, rank, devices), ckpt_path=resume)
    return module


def _run(rank: int, world: int, port: int, output: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    output = Path(output)
    for kind in ("density", "svi"):
        uninterrupted = train(kind, world, rank)
        checkpoints = output / f"checkpoints-{kind}"
        train(kind, world, rank, epochs=1, checkpoint_dir=checkpoints)
        resumed = train(kind, world, rank, resume=checkpoints / "last.ckpt")
        if rank == 0:
            torch.save(uninterrupted.state_dict(), output / f"{kind}-ddp.pt")
            torch.save(resumed.state_dict(), output / f"{kind}-ddp-resumed.pt")
    # Leaving the process with the gloo group alive lets its threads meet interpreter
    # shutdown, which now and then aborts the process ("terminate called without an
    # active exception", SIGABRT) after every result has been written.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(output: str, world: int = 2) -> None:
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_run, args=(world, port, output), nprocs=world, join=True)


if __name__ == "__main__":
    main(sys.argv[1])
