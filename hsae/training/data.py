"""A ``LightningDataModule`` over activation caches: train rows shuffled, val rows in order.

Rows are fetched a batch at a time (``Dataset.__getitems__``), not one by one, so the
loader costs one indexed copy per batch. Under DDP, Lightning's ``DistributedSampler``
gives each rank a disjoint share of the rows.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hsae.cache import ActivationCache


class CacheRows(Dataset):
    def __init__(self, cache: ActivationCache, in_memory: bool):
        self.cache = cache
        self.data = cache.load_all() if in_memory else None

    def __len__(self) -> int:
        return self.cache.n_rows

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, rows: list[int]) -> torch.Tensor:
        if self.data is not None:
            return self.data[torch.as_tensor(rows)]
        return self.cache.read(np.asarray(rows))


def _stack(batch: torch.Tensor) -> torch.Tensor:
    # __getitems__ already returns the batch as one tensor.
    return batch


class CacheDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_dir: str | Path,
        val_dir: str | Path,
        batch_size: int,
        in_memory: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir)
        self.batch_size, self.in_memory, self.num_workers = batch_size, in_memory, num_workers
        self.train_rows: CacheRows | None = None
        self.val_rows: CacheRows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is None:
            self.train_rows = CacheRows(ActivationCache.open(self.train_dir), self.in_memory)
            self.val_rows = CacheRows(ActivationCache.open(self.val_dir), self.in_memory)

    def _per_rank_batch(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        return max(1, self.batch_size // world)

    def _loader(self, rows: CacheRows, shuffle: bool) -> DataLoader:
        return DataLoader(
            rows,
            batch_size=min(self._per_rank_batch(), len(rows)),
            shuffle=shuffle,
            drop_last=shuffle,  # equal-size steps; validation sees every row
            collate_fn=_stack,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_rows is not None, "call setup() first"
        return self._loader(self.train_rows, shuffle=True)

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
