"""Read access to a finished activation cache (``ActivationCache.open``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hsae.cache.files import CACHE_FORMAT, IMAGE_IDS, LABELS, MANIFEST, TORCH_DTYPES
from hsae.cache.segments import SegmentTreeStore
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.rundir import sha256_file


class ActivationCache:
    """Read access to a finished cache; rows come back as float32 tensors."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        shards: list[np.ndarray],
        labels_nl: np.ndarray,
        image_ids: np.ndarray | None,
    ):
        self.path = path
        self.manifest = manifest
        self._shards = shards
        self._offsets = np.cumsum([0] + [len(s) for s in shards])
        self.labels_nl = labels_nl
        self.image_ids = image_ids  # dataset index of each cached image; None: all, in order
        self.hierarchy = Hierarchy.from_dict(manifest["hierarchy"])
        self._token_index = np.asarray(manifest["token_index"])
        # Ragged caches: [rows, 2] (dataset image, token) of every row, memory-mapped.
        self.row_index = (
            np.load(path / manifest["row_index"], mmap_mode="r")
            if manifest.get("row_index")
            else None
        )

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> ActivationCache:
        """Open and check a cache: every shard present with its recorded size and shape, and
        its checksum when ``verify``."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise HsaeError(
                f"no activation cache at {path} (missing {MANIFEST}); rerun train.py to build it"
            )
        rebuild_all = f"delete {path} and rerun train.py to rebuild it"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise HsaeError(f"{manifest_path} is not valid JSON ({e}); {rebuild_all}") from e
        if manifest.get("format") != CACHE_FORMAT:
            raise HsaeError(
                f"{path} has cache format {manifest.get('format')}, this hsae reads "
                f"{CACHE_FORMAT}; {rebuild_all}"
            )
        if not path.name.endswith(manifest["key"]):
            raise HsaeError(
                f"{path} holds the cache with key {manifest['key']} (its folder was renamed or "
                f"copied over); {rebuild_all}"
            )
        shards = []
        for shard in manifest["shards"]:
            file = path / shard["file"]
            # The receipts stay beside the shards, so a rebuild redoes only the deleted shard.
            rebuild = (
                f"delete {file} and {manifest_path}, then rerun train.py with the same config: "
                f"that shard is rebuilt and the others are reused (or delete all of {path})"
            )
            if not file.exists():
                raise HsaeError(f"activation cache shard {file} is missing; {rebuild}")
            if file.stat().st_size != shard["bytes"]:
                raise HsaeError(
                    f"activation cache shard {file} has {file.stat().st_size} bytes, the manifest "
                    f"says {shard['bytes']} (truncated or overwritten); {rebuild}"
                )
            if verify and sha256_file(file) != shard["sha256"]:
                raise HsaeError(
                    f"activation cache shard {file} fails its checksum (the file changed after "
                    f"it was written: disk or copy error); {rebuild}"
                )
            try:
                array = np.load(file, mmap_mode="r")
            except ValueError as e:
                raise HsaeError(
                    f"activation cache shard {file} cannot be read ({e}); {rebuild}"
                ) from e
            if array.shape != (shard["rows"], manifest["d_model"]):
                raise HsaeError(
                    f"activation cache shard {file} has shape {array.shape}, expected "
                    f"({shard['rows']}, {manifest['d_model']}); {rebuild}"
                )
            shards.append(array)
        labels_nl = np.load(path / LABELS)
        image_ids = np.load(path / IMAGE_IDS) if manifest["image_ids"] else None
        return cls(path, manifest, shards, labels_nl, image_ids)

    def __reduce__(self):
        # Pickled (ddp_spawn, spawned loader workers) as its folder and reopened there: the
        # memory-mapped shards would otherwise be copied whole into the pickle.
        return type(self).open, (self.path,)

    @property
    def n_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def shards(self) -> list[np.ndarray]:
        """The memory-mapped shards as stored (bfloat16 as uint16)."""
        return self._shards

    def to_float(self, array: np.ndarray) -> torch.Tensor:
        """Stored rows (a shard or a slice of one) -> a float32 tensor."""
        tensor = torch.from_numpy(np.array(array))  # a writable copy, out of the memory map
        if self.manifest["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows ``[len(rows), d]`` in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = torch.empty(len(rows), self.d_model)
        which = np.searchsorted(self._offsets, sorted_rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[torch.from_numpy(order[sel])] = self.to_float(
                self._shards[s][sorted_rows[sel] - self._offsets[s]]
            )
        return out

    def load_all(self) -> torch.Tensor:
        """All rows ``[n_rows, d]`` as float32."""
        return self.load_stored().float()

    def load_stored(self) -> torch.Tensor:
        """All rows ``[n_rows, d]`` in the storage dtype (float16 rows take half the memory)."""
        dtype = TORCH_DTYPES[self.manifest["dtype"]]
        if not self._shards:
            return torch.empty(0, self.d_model, dtype=dtype)
        stored = torch.cat([torch.from_numpy(np.array(s)) for s in self._shards])
        return stored.view(torch.bfloat16) if dtype == torch.bfloat16 else stored

    def row_image(self, rows: np.ndarray) -> np.ndarray:
        """Dataset image index of each row."""
        if self.row_index is not None:
            return np.asarray(self.row_index[np.asarray(rows), 0])
        image = np.asarray(rows) // self.manifest["tokens_per_image"]
        return image if self.image_ids is None else self.image_ids[image]

    def row_token(self, rows: np.ndarray) -> np.ndarray:
        """Token index of each row inside its image (-1: mean-pooled or unknown)."""
        if self.row_index is not None:
            return np.asarray(self.row_index[np.asarray(rows), 1])
        return self._token_index[np.asarray(rows) % self.manifest["tokens_per_image"]]

    def row_labels(self, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), n_levels]`` labels of each row's image."""
        return self.labels_nl[self.row_image(rows)]

    def segment_trees(self) -> SegmentTreeStore:
        """Each image's segment tree (caches of ``tokens=segments`` only)."""
        if not self.manifest.get("segment_trees"):
            raise HsaeError(
                f"{self.path} holds no segment trees: only caches built with "
                "backbone.tokens=segments (CAST) have them"
            )
        return SegmentTreeStore.load(self.path / self.manifest["segment_trees"])

    def image_names(self) -> list[str] | None:
        """Name (file path inside the dataset) of every dataset image, by dataset index."""
        if not self.manifest.get("image_names"):
            return None
        return (self.path / self.manifest["image_names"]).read_text().splitlines()
