"""Fast shuffled reading of an activation cache for training.

``ShuffledRowReader`` streams caches larger than RAM: each epoch it shuffles fixed-size
chunks of consecutive rows (so reads stay sequential in the memory-mapped shards), fills an
in-memory buffer with many chunks, shuffles the rows inside the buffer, and yields batches.
A background thread reads and converts the next batches while the caller trains (numpy and
torch copies release the GIL), into pinned memory when CUDA is present.

It takes ``rank`` and ``world_size``: each epoch the shuffled order is split into
``world_size`` disjoint, equal parts (rows beyond ``world_size * (n_rows // world_size)``
wait for the next epoch's shuffle), so under DDP every rank takes the same number of steps
and no row is seen twice in an epoch. It is an ``IterableDataset`` of whole batches: give
it to ``DataLoader(reader, batch_size=None)`` or iterate them directly. Each pass over a
reader is the next epoch, unless ``set_epoch`` says otherwise (call it when resuming).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hsae.cache.files import TORCH_DTYPES
from hsae.cache.reader import ActivationCache
from hsae.errors import HsaeError


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise HsaeError(f"rank={rank} and world_size={world_size}: need 0 <= rank < world_size")


def _check_single_process() -> None:
    info = get_worker_info()
    if info is not None and info.num_workers > 1:
        raise HsaeError(
            "the cache readers prefetch in a background thread and split rows by rank "
            "themselves; use DataLoader(reader, batch_size=None, num_workers=0)"
        )


def _seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**63))


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


class ShuffledRowReader(IterableDataset):
    """Shuffled batches ``[batch, d]`` (float32, or ``dtype``) streamed from a cache's shards.

    ``chunk_rows`` consecutive rows are read at a time (about 12 MB at d=768 in float16);
    ``buffer_rows`` rows (chunks from all over the cache, held in the storage dtype: 200 MB
    at the defaults) are shuffled together, so the rows of a batch come from about
    ``buffer_rows / chunk_rows`` places in the cache.
    ``prefetch`` batches are made ahead in a background thread.
    """

    def __init__(
        self,
        cache: ActivationCache,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        chunk_rows: int = 8192,
        buffer_rows: int = 131_072,
        prefetch: int = 4,
        pin_memory: bool | None = None,
        drop_last: bool = True,
        dtype: torch.dtype | None = torch.float32,
    ):
        self.cache = cache
        self.stored_dtype = TORCH_DTYPES[cache.manifest["dtype"]]
        # None: batches as stored (float16 from a float16 cache: half the copying, and the
        # GPU converts them for free).
        self.dtype = self.stored_dtype if dtype is None else dtype
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise HsaeError(f"batch_size={batch_size} must be >= 1")
        n_rows = cache.n_rows
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.rows_per_rank = n_rows // world_size
        if self.rows_per_rank < (batch_size if drop_last else 1):
            raise HsaeError(
                f"{n_rows} rows over {world_size} ranks leave {self.rows_per_rank} per rank, "
                f"fewer than one batch of {batch_size}; lower the batch size"
            )
        self.epoch = 0
        if chunk_rows < 1 or buffer_rows < batch_size or prefetch < 1:
            raise HsaeError(
                f"chunk_rows={chunk_rows}, buffer_rows={buffer_rows}, prefetch={prefetch}: need "
                "chunk_rows >= 1, buffer_rows >= batch_size and prefetch >= 1"
            )
        self.chunk_rows, self.buffer_rows, self.prefetch = chunk_rows, buffer_rows, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._offsets = np.cumsum([0] + [len(s) for s in self.cache.shards])

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass shuffles for (the shuffle is a function of seed and epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per pass on this rank (the same on every rank)."""
        if self.drop_last:
            return self.rows_per_rank // self.batch_size
        return -(-self.rows_per_rank // self.batch_size)

    def _next_epoch(self) -> int:
        epoch = self.epoch
        self.epoch += 1
        return epoch

    # -- which rows this rank reads, in which order --

    def spans(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's ``[start, stop)`` row ranges for ``epoch``, in reading order."""
        n_chunks = -(-self.n_rows // self.chunk_rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(n_chunks)
        starts = order * self.chunk_rows
        stops = np.minimum(starts + self.chunk_rows, self.n_rows)
        # The shuffled chunks laid end to end form one stream; each rank takes an equal slice.
        ends = np.cumsum(stops - starts)
        lo, hi = self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank
        spans = []
        for start, stop, end in zip(starts, stops, ends, strict=True):
            begin = end - (stop - start)
            a, b = max(begin, lo), min(end, hi)
            if a < b:
                spans.append((int(start + a - begin), int(start + b - begin)))
        return spans

    def _read_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Copy rows ``[start, stop)`` (possibly across shards) into ``out``, as stored."""
        s = int(np.searchsorted(self._offsets, start, side="right") - 1)
        filled = 0
        while start < stop:
            shard_stop = min(stop, int(self._offsets[s + 1]))
            part = self.cache.shards[s][start - self._offsets[s] : shard_stop - self._offsets[s]]
            np.copyto(out[filled : filled + len(part)], part)  # one copy out of the page cache
            filled += len(part)
            start, s = shard_stop, s + 1

    # -- producing batches --

    def _emit(self, rows: np.ndarray) -> torch.Tensor:
        """Stored rows -> a new batch tensor in ``dtype`` (pinned when asked)."""
        source = torch.from_numpy(rows)
        if self.stored_dtype == torch.bfloat16:  # stored as its uint16 bit pattern
            source = source.view(torch.bfloat16)
        out = torch.empty(rows.shape, dtype=self.dtype, pin_memory=self.pin_memory)
        return out.copy_(source)

    def _batches(self, epoch: int, stop: threading.Event) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(_seed(self.seed, epoch, self.rank))
        d, batch = self.cache.d_model, self.batch_size
        n_left = len(self)
        spans = self.spans(epoch)
        # The buffer keeps the storage dtype (half of float32's memory at float16). Rows are
        # gathered with numpy (several times faster than torch's indexing of float16 rows)
        # and converted by torch, a batch at a time.
        storage = self.cache.shards[0].dtype if self.cache.shards else np.float32
        gathered = np.empty((batch, d), dtype=storage)
        carry = np.empty((0, d), dtype=storage)
        i = 0
        while n_left and not stop.is_set():
            sizes, group = 0, []
            while i < len(spans) and sizes + len(carry) < self.buffer_rows:
                group.append(spans[i])
                sizes += spans[i][1] - spans[i][0]
                i += 1
            buffer = np.empty((len(carry) + sizes, d), dtype=storage)
            buffer[: len(carry)] = carry
            at = len(carry)
            for start, end in group:
                self._read_into(buffer[at : at + end - start], start, end)
                at += end - start
            last = i == len(spans)
            perm = rng.permutation(len(buffer))
            n_full = len(buffer) // batch
            for b in range(min(n_full, n_left)):
                np.take(buffer, perm[b * batch : (b + 1) * batch], axis=0, out=gathered)
                yield self._emit(gathered)
                n_left -= 1
            carry = buffer[perm[n_full * batch :]]
            if last and n_left and len(carry):  # drop_last=False: the short final batch
                yield self._emit(carry)
                n_left -= 1
            if last:
                break

    def __iter__(self) -> Iterator[torch.Tensor]:
        _check_single_process()
        epoch = self._next_epoch()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            item: object
            try:
                for item in self._batches(epoch, stop):
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                item = _DONE
            except BaseException as e:  # handed to the consumer, raised there
                item = _Failure(e)
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        thread = threading.Thread(target=produce, name="hsae-cache-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()
