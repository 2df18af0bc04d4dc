"""The shuffled shard reader and the in-memory batches: every row once per epoch, disjoint
equal parts per DDP rank, fresh shuffles per epoch, exact values in every storage dtype."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from hsae.cache import CacheRequest, ShuffledRowReader, get_or_build
from hsae.config import DatasetConfig
from hsae.data import make_dataset
from hsae.errors import HsaeError

N_ROWS, D = 1000, 8


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def cache(request, tmp_path_factory):
    """A cache whose source row r holds r // 32 and r % 32 in its first two columns (small
    integers, exact in every storage dtype), so every read row tells where it came from."""
    root = tmp_path_factory.mktemp("reader")
    acts = np.zeros((N_ROWS, D), dtype=np.float32)
    acts[:, 0], acts[:, 1] = np.arange(N_ROWS) // 32, np.arange(N_ROWS) % 32
    acts[:, 2:] = np.random.default_rng(0).normal(size=(N_ROWS, D - 2))
    np.save(root / "acts.npy", acts)
    source = make_dataset(DatasetConfig(name="activations", path=str(root / "acts.npy")), "train")
    # Shards of 97 rows: chunks of the reader straddle shard boundaries.
    cache = get_or_build(root, None, None, source, CacheRequest(0, "cls", request.param, 97))
    cache.expected = cache.load_all()
    return cache


def row_ids(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0] * 32 + batch[:, 1]).long().tolist()


def positions(cache, batches) -> list[int]:
    """Cache row of each read row (cache rows hold source rows, which the values encode)."""
    source_to_cache = {int(s): r for r, s in enumerate(cache.row_image(np.arange(cache.n_rows)))}
    return [source_to_cache[i] for b in batches for i in row_ids(b)]


def test_one_epoch_reads_every_row_once_with_its_values(cache):
    reader = ShuffledRowReader(cache, 64, chunk_rows=50, buffer_rows=200, drop_last=False)
    batches = list(reader)
    assert len(batches) == len(reader) == -(-cache.n_rows // 64)
    rows = positions(cache, batches)
    assert sorted(rows) == list(range(cache.n_rows))
    assert rows != sorted(rows)  # shuffled
    torch.testing.assert_close(torch.cat(batches), cache.expected[rows])
    assert all(b.dtype == torch.float32 for b in batches)


def test_batches_can_stay_in_the_storage_dtype(cache):
    reader = ShuffledRowReader(cache, 64, chunk_rows=50, buffer_rows=200, dtype=None)
    batches = list(reader)
    stored = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    assert {b.dtype for b in batches} == {stored[cache.manifest["dtype"]]}
    rows = positions(cache, [b.float() for b in batches])
    torch.testing.assert_close(torch.cat(batches).float(), cache.expected[rows])


def test_ranks_read_disjoint_equal_parts(cache):
    world = 3
    per_rank = []
    for rank in range(world):
        reader = ShuffledRowReader(
            cache, 32, seed=7, rank=rank, world_size=world, chunk_rows=40, buffer_rows=160
        )
        batches = list(reader)
        assert len(batches) == len(reader) == (cache.n_rows // world) // 32
        per_rank.append(positions(cache, batches))
    assert all(len(rows) == len(per_rank[0]) for rows in per_rank)
    seen = [r for rows in per_rank for r in rows]
    assert len(seen) == len(set(seen))  # disjoint
    # Without drop_last every rank's part together is all rows but the remainder.
    full = [
        positions(
            cache, ShuffledRowReader(cache, 32, seed=7, rank=r, world_size=world, drop_last=False)
        )
        for r in range(world)
    ]
    assert sum(len(rows) for rows in full) == world * (cache.n_rows // world)
    assert len({r for rows in full for r in rows}) == world * (cache.n_rows // world)


def test_each_epoch_shuffles_anew_and_set_epoch_replays(cache):
    reader = ShuffledRowReader(cache, 100, chunk_rows=25, buffer_rows=300)
    first, second = positions(cache, reader), positions(cache, reader)
    assert first != second and sorted(first) == sorted(second)
    reader.set_epoch(0)
    assert positions(cache, reader) == first
    again = ShuffledRowReader(cache, 100, chunk_rows=25, buffer_rows=300)
    assert positions(cache, again) == first  # a function of seed and epoch only


def test_stopping_early_ends_the_prefetch_thread(cache):
    reader = ShuffledRowReader(cache, 16, chunk_rows=20, buffer_rows=64, prefetch=2)
    before = threading.active_count()
    iterator = iter(reader)
    next(iterator)
    iterator.close()
    assert threading.active_count() == before
    assert not any(t.name == "hsae-cache-reader" for t in threading.enumerate())


def test_reader_errors_reach_the_caller(cache, monkeypatch):
    reader = ShuffledRowReader(cache, 16)

    def broken(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(reader, "_read_into", broken)
    with pytest.raises(OSError, match="disk gone"):
        list(reader)


def test_bad_arguments_are_errors(cache, monkeypatch):
    with pytest.raises(HsaeError, match="rank=2 and world_size=2"):
        ShuffledRowReader(cache, 8, rank=2, world_size=2)
    with pytest.raises(HsaeError, match="fewer than one batch"):
        ShuffledRowReader(cache, 10_000)
    with pytest.raises(HsaeError, match="buffer_rows >= batch_size"):
        ShuffledRowReader(cache, 64, buffer_rows=32)
    # Inside one of several DataLoader workers every worker would read the same rows.
    worker = type("WorkerInfo", (), {"num_workers": 2, "id": 0})()
    monkeypatch.setattr("hsae.cache.shuffled.get_worker_info", lambda: worker)
    with pytest.raises(HsaeError, match="num_workers=0"):
        next(iter(ShuffledRowReader(cache, 8)))


def test_the_datamodule_reads_the_cache_it_is_handed(cache, monkeypatch):
    """A training job opens each cache once: the DataModule reads the opened cache it is
    given (never reopens it by path) and refuses a path with the fix."""
    from hsae.cache import ActivationCache
    from hsae.training.data import CacheDataModule

    with pytest.raises(HsaeError, match=r"opened caches, got PosixPath .*ActivationCache\.open"):
        CacheDataModule(cache.path, cache, batch_size=64)
    opens = []
    monkeypatch.setattr(ActivationCache, "open", lambda *a, **k: opens.append(a))
    data = CacheDataModule(cache, cache, batch_size=64, in_memory=False)
    data.setup()
    assert data.train_rows.cache is cache and data.val_rows.cache is cache and opens == []
    streamed = torch.cat(list(data.train_dataloader()))
    assert len(streamed) == cache.n_rows // 64 * 64
    assert sorted(row_ids(streamed)) == sorted(set(row_ids(streamed)))  # each row once
