"""Multi-process training on PyTorch Lightning (``pip install "pyro-nf[lightning]"``).

:class:`FlowDensityModule` trains a :class:`~pyro_nf.Flow` by maximum likelihood and
:class:`SVIModule` runs SVI for any Pyro model and guide; both are
``LightningModule``\\ s, so ``Trainer(strategy="ddp", devices=N, num_nodes=M)`` scales
them out, with Lightning's checkpoints, early stopping, logging and progress bars.
They are built from the same pieces as :func:`pyro_nf.fit`
(:mod:`pyro_nf.infer.training`). ``import pyro_nf`` does not import this package.

Example:
    >>> import lightning.pytorch as pl
    >>> module = FlowDensityModule(pyro_nf.realnvp(2, num_layers=1, hidden_dims=(8,)))
    >>> isinstance(module, pl.LightningModule)   # trained by pl.Trainer(...).fit(module, loader)
    True
"""

try:
    import lightning.pytorch  # noqa: F401
except ModuleNotFoundError as error:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "pyro_nf.lightning needs PyTorch Lightning: pip install 'pyro-nf[lightning]' "
        "(or pip install lightning)"
    ) from error

from pyro_nf.lightning.modules import FlowDensityModule, SVIModule

__all__ = ["FlowDensityModule", "SVIModule"]
