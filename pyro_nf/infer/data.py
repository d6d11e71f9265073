"""Training data for flows: the split, the minibatch loaders, and arrays streamed from disk.

Every training driver of pyro-nf (:func:`pyro_nf.fit` in one process, the Lightning
modules of :mod:`pyro_nf.lightning` in several) reads its data through these pieces.
A minibatch is a tensor ``x`` of shape ``(B, D)`` or a pair ``(x, context)`` with a
context of shape ``(B, C)``; :func:`prepare_batch` checks one and moves it to a flow's
device and dtype.

Three kinds of data source:

- a :class:`ArrayDataset` (a tensor or a NumPy array, memory-mapped or not, read a
  whole minibatch per index list; :func:`pyro_nf.fit` wraps a tensor in one);
- any map-style :class:`torch.utils.data.Dataset` whose items are rows (``x`` or
  ``(x, context)``), collated by a :class:`~torch.utils.data.DataLoader`;
- any iterable of ready minibatches (a ``DataLoader``, an
  :class:`~torch.utils.data.IterableDataset` batched by one, or :class:`NpyBatches`,
  which streams a ``.npy`` file block by block so that memory does not grow with the
  number of rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from pyro_nf._validation import check_context, integer

__all__ = [
    "ArrayDataset",
    "EpochPermutation",
    "NpyBatches",
    "batch_loader",
    "prepare_batch",
    "split_indices",
]


class ArrayDataset(Dataset):
    """Rows of a 2-D array (and of an optional context array) as a map-style dataset.

    ``data`` may be a :class:`~torch.Tensor`, a NumPy array, a ``np.memmap`` or the path
    of a ``.npy`` file; a path is opened as a memory map for each read and closed after
    it, so the rows stay on disk (in the page cache) rather than in the process.
    ``dataset[i]`` is one row; ``dataset[indices]`` with a list or tensor of indices is
    the whole minibatch in one read, which :func:`batch_loader` uses.

    Arguments:
        data: shape ``(N, D)``, or a ``.npy`` path of such an array.
        context: shape ``(N, C)`` (same kinds), or None.

    Example:
        >>> dataset = ArrayDataset(torch.arange(12.0).reshape(6, 2))
        >>> len(dataset), dataset[[0, 5]].tolist()
        (6, [[0.0, 1.0], [10.0, 11.0]])
    """

    def __init__(self, data: object, context: object = None) -> None:
        self.data = self._open(data, "data")
        self.context = None if context is None else self._open(context, "context")
        if self.context is not None and len(self._view(self.context)) != len(self):
            raise ValueError(
                f"expected a context with one row per data row ({len(self)}), "
                f"got {len(self._view(self.context))}"
            )

    @staticmethod
    def _open(source: object, name: str) -> object:
        if isinstance(source, str | Path):
            path = Path(source)
            if path.suffix != ".npy" or not path.is_file():
                raise ValueError(f"expected the path of a .npy file for {name}, got {source}")
            return path
        if not isinstance(source, Tensor | np.ndarray) or source.ndim != 2:
            shape = getattr(source, "shape", type(source).__name__)
            raise ValueError(f"expected {name} of shape (N, D), got {shape}")
        return source

    @staticmethod
    def _view(source: object) -> Tensor | np.ndarray:
        if isinstance(source, Path):
            return np.load(source, mmap_mode="r")
        return source

    def __len__(self) -> int:
        return len(self._view(self.data))

    @property
    def dim(self) -> int:
        """The number of columns ``D`` of the data."""
        return self._view(self.data).shape[1]

    def _read(self, source: object, index: int | slice | Sequence[int] | Tensor) -> Tensor:
        view = self._view(source)
        if isinstance(view, Tensor):
            return view[index]
        if not isinstance(index, int | slice):
            index = np.asarray(index)
        # A copy: the rows leave the memory map (which is closed after the read).
        return torch.from_numpy(np.array(view[index]))

    def __getitem__(
        self, index: int | slice | Sequence[int] | Tensor
    ) -> Tensor | tuple[Tensor, Tensor]:
        x = self._read(self.data, index)
        return x if self.context is None else (x, self._read(self.context, index))


class EpochPermutation(Sampler[int]):
    """The given indices in a new random order at each pass (each ``iter``).

    The order comes from ``generator`` alone (the global RNG is untouched), so two
    loaders sharing the same indices and seed visit the same rows in the same order.

    Example:
        >>> sampler = EpochPermutation(torch.arange(4), torch.Generator().manual_seed(0))
        >>> sorted(sampler) == [0, 1, 2, 3]
        True
    """

    def __init__(self, indices: Tensor, generator: torch.Generator) -> None:
        self.indices = indices
        self.generator = generator

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.indices), generator=self.generator)
        # Python ints chunk by chunk: a list of all of them would take ~36 bytes a row.
        for chunk in self.indices[order].split(1 << 16):
            yield from chunk.tolist()


def split_indices(
    num_points: int, validation_fraction: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A random split of ``range(num_points)`` into training and validation indices.

    The validation split holds ``round(num_points * validation_fraction)`` points (at
    least one when the fraction is positive, none when it is zero).

    Raises:
        ValueError: if no training point is left.

    Example:
        >>> train, validation = split_indices(10, 0.2, torch.Generator().manual_seed(0))
        >>> len(train), len(validation)
        (8, 2)
    """
    num_validation = max(1, round(num_points * validation_fraction)) if validation_fraction else 0
    num_train = num_points - num_validation
    if num_train < 1:
        raise ValueError(
            f"no training data left: {num_points} points with validation_fraction="
            f"{validation_fraction}"
        )
    order = torch.randperm(num_points, generator=generator)
    return order[:num_train], order[num_train:]


def batch_loader(
    dataset: Dataset,
    indices: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator,
    num_workers: int = 0,
) -> DataLoader:
    """A loader of minibatches of ``dataset`` restricted to ``indices``.

    With ``shuffle`` the indices are visited in a new order at each pass
    (:class:`EpochPermutation`), else in the given order. An :class:`ArrayDataset` is
    read one minibatch per read; any other map-style dataset row by row and collated by
    the ``DataLoader``. Either way the same seed gives the same minibatches.
    """
    sampler = EpochPermutation(indices, generator) if shuffle else indices.tolist()
    # The loader draws a seed for its workers from this generator at each pass (from the
    # global RNG without one): a separate stream keeps the global RNG untouched.
    loader_generator = torch.Generator().manual_seed(int(generator.initial_seed()))
    if isinstance(dataset, ArrayDataset):
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(sampler, batch_size, drop_last=False),
            num_workers=num_workers,
            generator=loader_generator,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=loader_generator,
    )


class NpyBatches:
    """Minibatches streamed from a ``.npy`` file of shape ``(N, D)``, block by block.

    Each pass reads blocks of ``block_rows`` consecutive rows (in a random block order
    with ``shuffle``), shuffles the rows within a block and yields minibatches of
    ``batch_size`` rows; the file is opened as a memory map per block and closed after
    it. Memory is ``O(block_rows * D)`` whatever ``N``: no index over all rows exists.
    The shuffle is a block shuffle (rows of one minibatch come from one block), the
    usual trade for data too large to permute.

    Under ``torch.distributed`` (for example Lightning's DDP) every process reads the
    same global minibatches and keeps its own contiguous part of each, so that the
    processes together take the step one process takes on the global minibatch (a
    last minibatch with fewer rows than processes is skipped by all of them).

    Arguments:
        path: the ``.npy`` file.
        batch_size: rows per (global) minibatch.
        rows: the ``(start, stop)`` range of rows to read (default: all), e.g. to hold
            out a validation range.
        context_path: an optional ``.npy`` file of shape ``(N, C)``: minibatches are
            then ``(x, context)`` pairs.
        block_rows: rows read from disk at once (a multiple of ``batch_size`` is best).
        shuffle: random block order and row order within blocks, new at each pass.
        seed: the seed of the shuffle (pass ``k`` uses ``seed + k``).
        dtype: the dtype of the yielded tensors (default: the torch default dtype).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "rows.npy")
        >>> np.save(path, np.arange(20, dtype=np.float32).reshape(10, 2))
        >>> tuple(tuple(b.shape) for b in NpyBatches(path, batch_size=4, shuffle=False))
        ((4, 2), (4, 2), (2, 2))
    """

    def __init__(
        self,
        path: str | Path,
        batch_size: int,
        *,
        rows: tuple[int, int] | None = None,
        context_path: str | Path | None = None,
        block_rows: int = 1 << 18,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.dataset = ArrayDataset(path, context_path)
        total = len(self.dataset)
        start, stop = (0, total) if rows is None else rows
        if not 0 <= start < stop <= total:
            raise ValueError(f"expected rows (start, stop) within [0, {total}], got {rows}")
        self.start, self.stop = start, stop
        self.batch_size = integer("batch_size", batch_size)
        self.block_rows = max(integer("block_rows", block_rows), self.batch_size)
        self.shuffle, self.seed = shuffle, seed
        self.dtype = dtype
        self.passes = 0

    def __len__(self) -> int:
        return math.ceil((self.stop - self.start) / self.batch_size)

    @staticmethod
    def _process() -> tuple[int, int]:
        """``(rank, world size)`` under torch.distributed, else ``(0, 1)``."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0, 1
        return torch.distributed.get_rank(), torch.distributed.get_world_size()

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        starts = torch.arange(self.start, self.stop, self.block_rows)
        if self.shuffle:
            starts = starts[torch.randperm(len(starts), generator=generator)]
        dtype = self.dtype or torch.get_default_dtype()
        rank, world = self._process()
        for block_start in starts.tolist():
            block_stop = min(block_start + self.block_rows, self.stop)
            # One contiguous read per block; the shuffle happens in memory.
            block = self.dataset[slice(block_start, block_stop)]
            parts = block if isinstance(block, tuple) else (block,)
            if self.shuffle:
                order = torch.randperm(block_stop - block_start, generator=generator)
                parts = tuple(p[order] for p in parts)
            parts = tuple(p.to(dtype) for p in parts)
            for chunk in zip(*(p.split(self.batch_size) for p in parts), strict=True):
                if len(chunk[0]) < world:
                    continue  # a last minibatch too small to give every process a row
                batch = tuple(c.tensor_split(world)[rank] for c in chunk)
                yield batch[0] if len(batch) == 1 else batch


def prepare_batch(
    batch: Tensor | Sequence[Tensor | None], dim: int, context_dim: int, like: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Check a minibatch and move it to ``like``'s device and dtype.

    :func:`pyro_nf.fit` also checks a whole data tensor with it (``like=None``: checked,
    not moved) before training.

    Arguments:
        batch: ``x`` of shape ``(B, dim)``, or ``(x,)``, or ``(x, context)`` with a
            context of shape ``(B, context_dim)``.
        dim: the flow's event size.
        context_dim: the flow's context size (0: unconditional, no context allowed).
        like: a tensor on the target device and dtype (e.g. a flow's buffer), or None
            to leave the tensors where they are.

    Returns:
        ``(x, context)``, the context None for an unconditional flow.

    Raises:
        ValueError: on a wrong shape, a missing or unexpected context, or non-finite
            values; TypeError: a context that is not a tensor.

    Example:
        >>> x, c = prepare_batch(torch.zeros(3, 2), dim=2, context_dim=0, like=torch.ones(1))
        >>> tuple(x.shape), c
        ((3, 2), None)
    """
    if isinstance(batch, Tensor):
        x, context = batch, None
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and 1 <= len(batch) <= 2:
        x, context = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise ValueError(
            f"expected a minibatch x or (x, context) of tensors, got {type(batch).__name__}"
        )
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected data of shape (N, {dim}), got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError("data contains non-finite values (NaN or inf)")
    if like is not None:
        x = x.to(device=like.device, dtype=like.dtype)
    check_context("the flow", context, context_dim)
    if context is None:
        return x, None
    if tuple(context.shape) != (x.shape[0], context_dim):
        raise ValueError(
            f"expected a context of shape ({x.shape[0]}, {context_dim}), one row per data "
            f"row, got {tuple(context.shape)}"
        )
    if not torch.isfinite(context).all():
        raise ValueError("context contains non-finite values (NaN or inf)")
    return x, context if like is None else context.to(device=like.device, dtype=like.dtype)
