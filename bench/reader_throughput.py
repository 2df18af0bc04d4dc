"""Rows/s reading a float16 activation cache (d=768) whose shards are in the page cache.

Builds a cache of random rows (through the ``activations`` source), reads it once to warm
the page cache, then times one epoch of each way of reading it for training:

- ``ShuffledRowReader``: chunk shuffle + buffer shuffle + background prefetch (caches larger
  than RAM), batches of float32, and of float16 as stored (``dtype=None``, for GPUs);
- ``ActivationCache.read`` of random row indices (the map-style path a ``DataLoader`` with
  ``shuffle=True`` takes over memory-mapped shards), for comparison.

Usage: python bench/reader_throughput.py [--rows 400000] [--batch 4096] [--json out.json]
The default size (about 600 MB of shards, 2.5 GB of RAM at most) keeps it near a minute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time

import numpy as np
import torch

from hsae.cache import CacheRequest, ShuffledRowReader, get_or_build
from hsae.config import DatasetConfig
from hsae.data import make_dataset

D_MODEL = 768


def timed_epoch(batches, limit_rows: int | None = None) -> tuple[float, int]:
    start, n_rows = time.perf_counter(), 0
    for batch in batches:
        n_rows += len(batch)
        if limit_rows is not None and n_rows >= limit_rows:
            break
    return n_rows / (time.perf_counter() - start), n_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    machine = (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        source_file = os.path.join(tmp, "acts.npy")
        np.save(
            source_file,
            rng.standard_normal((args.rows, D_MODEL), dtype=np.float32).astype(np.float16),
        )
        source = make_dataset(
            DatasetConfig(name="activations", path=source_file, val_fraction=0.001), "train"
        )
        cache = get_or_build(
            os.path.join(tmp, "cache"),
            None,
            None,
            source,
            CacheRequest(0, "cls", "float16", 131_072),
        )
        os.remove(source_file)
        for shard in cache.shards:  # into the page cache
            np.asarray(shard).sum(dtype=np.float32)
        n = cache.n_rows
        results = {}

        reader = ShuffledRowReader(cache, args.batch, pin_memory=False)
        results["shuffled_reader"] = timed_epoch(reader)
        reader = ShuffledRowReader(cache, args.batch, pin_memory=False, dtype=None)
        results["shuffled_reader_f16"] = timed_epoch(reader)

        order = rng.permutation(n)
        batches = (cache.read(order[i : i + args.batch]) for i in range(0, n, args.batch))
        results["random_read"] = timed_epoch(batches, limit_rows=min(n, 100 * args.batch))

    print(
        f"cache: {n:,} rows x {D_MODEL} float16 ({n * D_MODEL * 2 / 1e9:.2f} GB), batch {args.batch}"
    )
    for name, (rows_s, rows) in results.items():
        print(f"{name:16s} {rows_s:>12,.0f} rows/s  ({rows:,} rows)")
    print(f"machine: {machine}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "rows": n,
                    "d_model": D_MODEL,
                    "batch": args.batch,
                    "rows_per_s": {k: round(v[0]) for k, v in results.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
