"""The training data order: a batch as a pure function of ``(micro-step, rank, world)``.

The loop asks ``batches(i, rank, world)`` for micro-step ``i`` and relies on the answer being
a function of its arguments alone: that is what makes a resumed run read what an
uninterrupted one would.

* :class:`IndexedBatches` (a map-style dataset read in this process: code shards, small sets):
  step ``i`` reads positions of an endless stream of seeded permutations.

The loader classes keep that contract while decoding real data ahead in ``data.num_workers``
worker processes: a DataLoader is started at the first step asked for and read in order (it
yields batch ``n`` for step ``start + n``); a step asked for out of order starts a new one there.

* :class:`FolderBatches` (a map-style dataset, e.g. an image folder): step ``i`` reads the
  positions :class:`IndexedBatches` gives it, exactly as without workers.
* :class:`ShardBatches` (WebDataset shards): each process's shards are split among
  ``slots`` readers (the DataLoader workers; 1 without them) by :func:`~vqgen.data.loaders.shards_of`,
  so no shard is read twice in an epoch; reader ``s`` reads its shards epoch after epoch
  (each epoch a new seeded shard order and shuffle buffer), and step ``i`` takes the raw
  samples ``[(i // slots) * B, (i // slots + 1) * B)`` of reader ``i % slots``. A resumed run
  fast-forwards every reader to its position by reading tar records without decoding them:
  the granularity is one sample, and the order depends on the number of processes and
  ``data.num_workers``, which a resumed run must keep.

A sample that cannot be used (unreadable image, damaged shard, missing caption under
``missing_caption=skip``) leaves its batch one smaller: it is never replaced by another sample,
which would train on that one twice. ``skipped`` counts them by reason in this process since
the run (re)started (the loop sums them over processes into its logs), in a
:class:`~vqgen.data.loaders.SkipCounter`, which names the first of each reason in a warning.
"""

from __future__ import annotations

import abc
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from vqgen.config import ConfigError
from vqgen.data.loaders import (
    SKIP_REASONS,
    DataError,
    SkipCounter,
    Skipped,
    Tolerant,
    WebDatasetSamples,
    collate_usable,
)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, list everything else (captions, scenes)."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class IndexedBatches:
    """Batches of a map-style dataset as a pure function of ``(i, rank, world)``.

    The global batch of micro-step ``i`` is positions ``[i * world * B, (i + 1) * world * B)``
    of an endless stream of epochs, each a permutation seeded by ``(seed, epoch)``; rank ``r``
    takes its contiguous slice. So resuming at step ``s`` reads exactly what an uninterrupted
    run would, and processes never read the same sample within a step.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (epoch, order)
        return self._perm[1]

    def indices(self, i: int, rank: int, world: int) -> list[int]:
        return [j for _, j in self.epochs_and_indices(i, rank, world)]

    def epochs_and_indices(self, i: int, rank: int, world: int) -> list[tuple[int, int]]:
        """(epoch, dataset index) of each sample of micro-step ``i`` on rank ``rank``."""
        n = len(self.dataset)
        start = (i * world + rank) * self.batch_size
        return [(p // n, int(self._order(p // n)[p % n])) for p in range(start, start + self.batch_size)]

    def __call__(self, i: int, rank: int, world: int) -> dict:
        return collate([self.dataset[j] for j in self.indices(i, rank, world)])


class LoaderBatches(abc.ABC):
    """``(i, rank, world) -> batch`` read from a DataLoader that subclasses start at step ``i``."""

    def __init__(self, batch_size: int, num_workers: int, device: torch.device | str = "cpu"):
        if num_workers < 0:
            raise ConfigError(f"config key 'data.num_workers' is {num_workers}; use 0 (decode in this process) or more")
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, torch.device(device)
        self.skipped = SkipCounter(dict.fromkeys(SKIP_REASONS, 0))  # every reason, so all processes sum the same keys
        self._batches: Iterator[dict[str, Any]] | None = None
        self._next: tuple[int, int, int] | None = None

    @abc.abstractmethod
    def loader(self, start: int, rank: int, world: int) -> DataLoader:
        """A DataLoader whose ``n``-th batch is that of micro-step ``start + n``."""

    def __call__(self, i: int, rank: int, world: int) -> dict[str, Any]:
        if self._next != (i, rank, world):
            self.close()
            self._batches = iter(self.loader(i, rank, world))
        batch = next(self._batches)
        self._next = (i + 1, rank, world)
        self.skipped.record(batch.pop("skipped"))
        if batch["image"] is None:
            raise DataError(
                f"no sample of micro-step {i} on process {rank} can be used (all {self.batch_size} were dropped); "
                "clean the data or raise the batch size"
            )
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def close(self) -> None:
        """Stop the worker processes (a new call starts them again)."""
        self._batches, self._next = None, None

    def _dataloader(self, dataset: Dataset, workers: int, collate_fn=collate_usable, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",  # so that .to(device, non_blocking=True) overlaps
            prefetch_factor=4 if workers else None,
            # its own generator: starting workers draws a seed, which must not advance the
            # training RNG (a resumed run starts them at another step than a straight one)
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        )


class FolderBatches(LoaderBatches):
    """The batches of :class:`IndexedBatches` over a map-style dataset, decoded in workers."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        on_bad_sample: str = "skip",
    ):
        super().__init__(batch_size, num_workers, device)
        self.order = IndexedBatches(dataset, batch_size, seed=seed)
        self.dataset = Tolerant(dataset, on_bad_sample)
        # files dropped when the folder was listed (uncaptioned): counted once, by process 0
        self._listed = Counter(getattr(dataset, "skipped", {}))

    def loader(self, start: int, rank: int, world: int) -> DataLoader:
        if rank == 0:
            self.skipped.update(self._listed)
            self._listed = Counter()
        steps = (self.order.indices(i, rank, world) for i in itertools.count(start))
        return self._dataloader(self.dataset, self.num_workers, batch_sampler=steps)


class _ShardReaders(IterableDataset):
    """Batches of the readers of one process: DataLoader worker ``w`` produces the batches of
    micro-steps ``start + w``, ``start + w + slots``, ..., all from reader ``(start + w) % slots``."""

    def __init__(self, samples: WebDatasetSamples, batch_size: int, start: int, rank: int, world: int, slots: int):
        self.samples, self.batch_size = samples, batch_size
        self.start, self.rank, self.world, self.slots = start, rank, world, slots

    def _records(self, slot: int) -> Iterator[dict[str, Any]]:
        """Reader ``slot``'s endless record stream, epoch after epoch."""
        for epoch in itertools.count():
            count = 0
            for raw in self.samples.stream(self.rank, self.world, slot, self.slots, epoch):
                count += 1
                yield raw
            if not count:
                raise DataError(
                    f"the shards of reader {slot} on process {self.rank} hold no sample in epoch {epoch}: "
                    f"{self.samples.epoch_shards(epoch)[self.rank + self.world * slot :: self.world * self.slots]}"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        first = self.start + (info.id if info is not None else 0)  # this worker's first micro-step
        slot, position = first % self.slots, (first // self.slots) * self.batch_size
        records = itertools.islice(self._records(slot), position, None)  # fast-forward: no decoding
        self.samples.newly_damaged()  # damage found before (in an earlier read) is not this read's
        while True:
            items: list[dict[str, Any] | Skipped] = [
                self.samples.decode_or_skip(raw) for raw in itertools.islice(records, self.batch_size)
            ]
            yield collate_usable(items + self.samples.newly_damaged())


class ShardBatches(LoaderBatches):
    """Batches streamed from WebDataset shards (see the module docstring for the order)."""

    def __init__(
        self, samples: WebDatasetSamples, batch_size: int, num_workers: int = 0, device: torch.device | str = "cpu"
    ):
        super().__init__(batch_size, num_workers, device)
        self.samples = samples

    def slots(self, world: int) -> int:
        """Readers per process: the DataLoader workers, as many as every one can have a shard."""
        shards = len(self.samples.shards)
        if shards < world:
            raise ConfigError(
                f"config key 'data.path' gives {shards} training shard(s) for {world} processes; write at least one "
                "shard per process (img2dataset: a smaller --number_sample_per_shard)"
            )
        slots = max(1, min(self.num_workers, shards // world))
        if slots < self.num_workers:
            warnings.warn(
                f"data.num_workers={self.num_workers}, but {shards} shards for {world} process(es) keep only {slots} "
                "busy; write more shards to decode in more workers",
                stacklevel=2,
            )
        return slots

    def loader(self, start: int, rank: int, world: int) -> DataLoader:
        slots = self.slots(world)
        readers = _ShardReaders(self.samples, self.batch_size, start, rank, world, slots)
        return self._dataloader(readers, slots if self.num_workers else 0, collate_fn=_as_is, batch_size=None)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The readers collate their batches themselves."""
    return batch
