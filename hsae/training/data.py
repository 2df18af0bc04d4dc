"""A ``LightningDataModule`` over activation caches: train rows shuffled, val rows in order.

Rows are fetched a batch at a time (``Dataset.__getitems__``), not one by one, so the
loader costs one indexed copy per batch. Under DDP, ``GlobalBatchSampler`` cuts every
global batch into one contiguous share per rank: the ranks together see exactly the
batches a single process would, so N ranks train like one process with the same
global batch size.

The module takes opened caches (``ActivationCache``), so a training job opens each cache
once; under DDP every rank runs the job and opens its own.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hsae.cache import ActivationCache, ShuffledRowReader
from hsae.errors import HsaeError

log = logging.getLogger(__name__)


class CacheRows(Dataset):
    """A cache's rows, read from its shards per batch or held whole in memory as stored
    (float16 takes half of float32's room), on the CPU or moved to an accelerator with
    ``to``; batches come out float32 either way."""

    def __init__(self, cache: ActivationCache, in_memory: bool):
        self.cache = cache
        self.data = cache.load_stored() if in_memory else None

    @property
    def device(self) -> torch.device:
        return self.data.device if self.data is not None else torch.device("cpu")

    def to(self, device: torch.device) -> None:
        if self.data is not None:
            self.data = self.data.to(device)

    def __len__(self) -> int:
        return self.cache.n_rows

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, rows: list[int]) -> torch.Tensor:
        if self.data is not None:
            return self.data[torch.as_tensor(rows, device=self.data.device)].float()
        return self.cache.read(np.asarray(rows))


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of a seeded per-epoch permutation."""

    def __init__(
        self,
        n_rows: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if global_batch % world_size:
            raise HsaeError(
                f"optim.batch_size={global_batch} must be divisible by the number of ranks "
                f"({world_size}) so every rank gets an equal share"
            )
        self.n_rows, self.global_batch = n_rows, min(global_batch, n_rows)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        # Training drops the last partial batch (equal steps); validation keeps every row.
        self.drop_last = shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _n_global_batches(self) -> int:
        if self.drop_last:
            return self.n_rows // self.global_batch
        return -(-self.n_rows // self.global_batch)

    def __len__(self) -> int:
        return sum(1 for _ in self._shares())

    def _shares(self):
        for b in range(self._n_global_batches()):
            start = b * self.global_batch
            size = min(self.global_batch, self.n_rows - start)
            share = -(-size // self.world_size)
            lo, hi = start + self.rank * share, min(start + size, start + (self.rank + 1) * share)
            if hi > lo:
                yield lo, hi

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n_rows, generator=generator)
        else:
            order = torch.arange(self.n_rows)
        for lo, hi in self._shares():
            yield order[lo:hi].tolist()


def _stack(batch: torch.Tensor) -> torch.Tensor:
    # __getitems__ already returns the batch as one tensor.
    return batch


class CacheDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_cache: ActivationCache,
        val_cache: ActivationCache,
        batch_size: int,
        in_memory: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        on_device: bool = True,
    ):
        super().__init__()
        for split, cache in (("train", train_cache), ("val", val_cache)):
            if not isinstance(cache, ActivationCache):
                raise HsaeError(
                    f"CacheDataModule takes opened caches, got {type(cache).__name__} {cache!r} "
                    f"as the {split} cache; pass ActivationCache.open(path) (or get_or_build's)"
                )
        self.seed, self.on_device = seed, on_device
        self.train_cache, self.val_cache = train_cache, val_cache
        self.batch_size, self.in_memory, self.num_workers = batch_size, in_memory, num_workers
        self.train_rows: CacheRows | None = None
        self.val_rows: CacheRows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is None:
            self.train_rows = CacheRows(self.train_cache, self.in_memory)
            self.val_rows = CacheRows(self.val_cache, self.in_memory)
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if self.in_memory and self.on_device and device.type != "cpu":
            self._move_rows(device)

    def _move_rows(self, device: torch.device) -> None:
        """Rows on the accelerator: batches are gathered there and never cross PCIe. Only
        when they take at most half of its free memory (the SAEs need the rest)."""
        assert self.train_rows is not None and self.val_rows is not None
        if self.train_rows.device == device:
            return
        rows = (self.train_rows.data, self.val_rows.data)
        needed = sum(r.numel() * r.element_size() for r in rows if r is not None)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else needed * 2
        if needed > free / 2:
            log.warning(
                "the cache (%.1f GB) does not fit in half of %s's free memory (%.1f GB): "
                "batches come from RAM (set optim.on_device=false to silence this)",
                needed / 1e9, device, free / 1e9,
            )  # fmt: skip
            return
        self.train_rows.to(device)
        self.val_rows.to(device)

    def _loader(self, rows: CacheRows, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        sampler = GlobalBatchSampler(len(rows), self.batch_size, rank, world, shuffle, self.seed)
        return DataLoader(
            rows,
            batch_sampler=sampler,
            collate_fn=_stack,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available() and rows.device.type == "cpu",
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_rows is not None, "call setup() first"
        if self.in_memory:
            return self._loader(self.train_rows, shuffle=True)
        # A cache bigger than RAM: random rows from memory-mapped shards are 12-15x slower
        # than shuffling chunks through a buffer (docs/cache.md), so stream it instead.
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        reader = ShuffledRowReader(
            self.train_rows.cache, max(1, self.batch_size // world), seed=self.seed,
            rank=rank, world_size=world,
        )  # fmt: skip
        reader.set_epoch(trainer.current_epoch if trainer else 0)  # a resumed run goes on
        return DataLoader(reader, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        assert self.val_rows is not None, "call setup() first"
        return self._loader(self.val_rows, shuffle=False)

    def sample(self, n_rows: int, seed: int = 0) -> torch.Tensor:
        """The same seeded sample of training rows on every rank (for data-dependent init)."""
        self.setup()
        assert self.train_rows is not None
        n_total = len(self.train_rows)
        rows = np.random.default_rng(seed).choice(n_total, size=min(n_rows, n_total), replace=False)
        return self.train_rows.__getitems__(np.sort(rows).tolist())
