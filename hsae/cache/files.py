"""The files of a cache folder: their names, the storage dtypes, and the atomic writers
builder and segment trees share (a reader never sees a half-written file)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.rundir import write_atomic, write_json

CACHE_FORMAT = 2
MANIFEST = "manifest.json"
LABELS = "labels.npy"
IMAGE_IDS = "image_ids.npy"
IMAGE_NAMES = "images.txt"
ROW_INDEX = "row_index.npy"  # ragged caches: [rows, 2] (dataset image, token) of each row
SEGMENT_TREES = "segment_trees.npz"  # ragged caches: each image's segment tree
NUMPY_STORAGE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def save_json(path: Path, obj: Any) -> None:
    write_json(path, obj, trailing_newline=False)


def save_npy(path: Path, array: np.ndarray) -> str:
    return write_atomic(path, lambda f: np.save(f, array))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    buffer = io.BytesIO()  # zip archives need a seekable file
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle in **
    return write_atomic(path, buffer.getvalue())
