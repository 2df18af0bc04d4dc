"""Variable token counts (``tokens=segments``, CAST's segment tokens): each batch's row
index and segment trees as arrays, joined into one file per cache, and read back as a
``SegmentTreeStore``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsae.cache.files import ROW_INDEX, SEGMENT_TREES, save_npy, save_npz
from hsae.errors import HsaeError


def ragged_part(kept: list[int], segment_rows: Any, trees: Any) -> dict[str, np.ndarray]:
    """One batch's row index and segment trees as arrays (dataset image ids, not batch
    positions)."""
    ids = np.asarray(kept, dtype=np.int64)
    part = {
        "row_index": np.stack(
            [ids[segment_rows.image_n.cpu().numpy()], segment_rows.token_n.cpu().numpy()], 1
        ).astype(np.int64),
        "image_ids": ids,
        "segments": trees.segments_bhw.cpu().numpy().astype(np.int16),
    }
    for k, (parent, weight) in enumerate(zip(trees.parents, trees.confidence, strict=True)):
        part[f"parents_{k}"] = parent.cpu().numpy().astype(np.int16)
        part[f"confidence_{k}"] = weight.float().cpu().numpy().astype(np.float16)
    return part


def join_ragged(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate batches; per-token arrays are padded to the widest (parents -1)."""
    if not parts:
        return {"row_index": np.zeros((0, 2), np.int64), "image_ids": np.zeros(0, np.int64)}
    joined = {}
    for key in parts[0]:
        arrays = [p[key] for p in parts]
        if key.startswith(("parents_", "confidence_")):
            width = max(a.shape[1] for a in arrays)
            fill = -1 if key.startswith("parents_") else 0
            arrays = [
                np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays
            ]
        joined[key] = np.concatenate(arrays)
    return joined


def ragged_path(folder: Path, s: int) -> Path:
    """Shard ``s``'s row index and trees, written beside it during the build."""
    return folder / f"ragged-{s:05d}.npz"


def join_ragged_files(folder: Path, n_shards: int) -> dict:
    """The shards' row indexes and trees joined into the cache's two files; returns their
    manifest entries."""
    parts = []
    for s in range(n_shards):
        with np.load(ragged_path(folder, s)) as f:
            parts.append(dict(f))
    joined = join_ragged(parts)
    save_npy(folder / ROW_INDEX, joined.pop("row_index"))
    save_npz(folder / SEGMENT_TREES, joined)
    return {"row_index": ROW_INDEX, "segment_trees": SEGMENT_TREES}


@dataclass(frozen=True)
class SegmentTreeStore:
    """Each cached image's segment tree: ``segments [n, h, w]`` (stage-1 token of each
    stem-grid cell), ``parents[k] [n, s_k]`` (the stage-k+1 token each stage-k token is
    assigned to, -1 for padding) and ``confidence[k]`` (that assignment's weight)."""

    image_ids: np.ndarray
    segments: np.ndarray
    parents: list[np.ndarray]
    confidence: list[np.ndarray]

    @classmethod
    def load(cls, path: Path) -> SegmentTreeStore:
        with np.load(path) as f:
            n_stages = sum(1 for k in f.files if k.startswith("parents_"))
            return cls(
                f["image_ids"],
                f["segments"],
                [f[f"parents_{k}"] for k in range(n_stages)],
                [f[f"confidence_{k}"] for k in range(n_stages)],
            )

    def levels(self, image_id: int) -> list[np.ndarray]:
        """The image's partitions of the stem grid, finest first: superpixels, then each
        stage's clusters (``[h, w]`` segment ids each)."""
        where = np.flatnonzero(self.image_ids == image_id)
        if len(where) != 1:
            raise HsaeError(f"image {image_id} has no segment tree in this cache")
        i = int(where[0])
        level = self.segments[i].astype(np.int64)
        levels = [level]
        for parents in self.parents:
            level = parents[i].astype(np.int64)[level]
            levels.append(level)
        return levels
