"""A user's own activations (``[rows, d]`` in a ``.npy`` or ``.safetensors`` file) as a cache
source, so SAEs can be trained on activations made elsewhere; no backbone runs.

Each row plays the part of an image: its labels (optional: a ``.npy`` of ``[rows]`` or
``[rows, levels]`` non-negative integers given as ``dataset.labels``, or a ``labels`` tensor
in the same ``.safetensors`` file) come from the same row. The val split is ``val_path``
when given, else a seeded ``val_fraction`` of the rows; the cache lists the source rows it
holds (``image_ids``), so every cached row leads back to its row in the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from hsae.data.common import check_split, seeded_subset
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.rundir import sha256_file

FORMATS = (".npy", ".safetensors")
LABELS_KEY = "labels"
_BLOCK = 4096  # rows per contiguous read from a .safetensors file


def _sha256(path: Path) -> str:
    return sha256_file(path)[:16]  # short: it names the file in a cache key


def _open_rows(path: Path, key: str | None):
    """``(take(sorted rows) -> float32 [n, d], shape, labels or None)`` for one file."""
    if path.suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise HsaeError(f"dataset.path={str(path)!r} is not a readable .npy array: {e}") from e
        if array.dtype.kind not in "fiu":
            raise HsaeError(f"{path} holds {array.dtype} values; activations must be numbers")
        return (lambda rows: np.asarray(array[rows], dtype=np.float32)), array.shape, None
    from safetensors import safe_open

    handle = safe_open(str(path), framework="pt")
    keys = [k for k in handle.keys() if k != LABELS_KEY]  # noqa: SIM118 - not a dict
    if key is None:
        if len(keys) != 1:
            raise HsaeError(
                f"{path} holds tensors {keys}; set dataset.key to the one with the activations"
            )
        key = keys[0]
    if key not in handle.keys():  # noqa: SIM118
        raise HsaeError(f"dataset.key={key!r} is not in {path}; it holds {keys}")
    tensor = handle.get_slice(key)
    shape = tuple(tensor.get_shape())
    labels = (
        handle.get_tensor(LABELS_KEY).numpy() if LABELS_KEY in handle.keys() else None  # noqa: SIM118
    )

    def take(rows: np.ndarray) -> np.ndarray:
        # safetensors slices are contiguous: read each block of rows that holds some.
        blocks = rows // _BLOCK
        out = []
        for b in np.unique(blocks):
            sel = rows[blocks == b]
            span = tensor[int(sel[0]) : int(sel[-1]) + 1].to(torch.float32).numpy()
            out.append(span[sel - sel[0]])
        return np.concatenate(out)

    return take, shape, labels


def _hierarchy_from_labels(labels_nl: np.ndarray) -> Hierarchy:
    """Levels ``level0`` (coarse) .. ``levelN`` (fine); class names are the label values."""
    n_levels = labels_nl.shape[1]
    n_classes = [int(labels_nl[:, lvl].max()) + 1 for lvl in range(n_levels)]
    parents: list[tuple[int, ...]] = [tuple([-1] * n_classes[0])]
    for lvl in range(1, n_levels):
        parent = np.full(n_classes[lvl], -1, dtype=np.int64)
        pairs = np.unique(labels_nl[:, lvl - 1 : lvl + 1], axis=0)
        for above, c in pairs.tolist():
            if parent[c] not in (-1, above):
                raise HsaeError(
                    f"labels: class {c} at level {lvl} has two parents ({parent[c]} and {above}) "
                    f"at level {lvl - 1}; label columns must form a tree, coarse to fine"
                )
            parent[c] = above
        parent[parent < 0] = 0  # labels that never occur: any parent keeps the tree valid
        parents.append(tuple(parent.tolist()))
    return Hierarchy(
        level_names=tuple(f"level{lvl}" for lvl in range(n_levels)),
        class_names=tuple(tuple(str(c) for c in range(n)) for n in n_classes),
        parents=tuple(parents),
    )


class ActivationArray:
    """The rows of one split of an activations file, ready to be copied into a cache."""

    def __init__(
        self,
        path: str | None,
        split: str,
        *,
        val_path: str | None = None,
        labels: str | None = None,
        key: str | None = None,
        val_fraction: float = 0.1,
        max_images: int | None = None,
        seed: int = 0,
    ):
        check_split("activations", split)
        if path is None:
            raise HsaeError(
                "dataset=activations needs dataset.path=<file.npy|file.safetensors> of [rows, d]"
            )
        use_val_file = split == "val" and val_path is not None
        file = Path(val_path if use_val_file else path).expanduser()  # type: ignore[arg-type]
        if not file.is_file() or file.suffix not in FORMATS:
            raise HsaeError(
                f"dataset.{'val_path' if use_val_file else 'path'}={str(file)!r} is not a "
                f"{' or '.join(FORMATS)} file"
            )
        self.file = file.resolve()
        self._read, shape, file_labels = _open_rows(self.file, key)
        if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
            raise HsaeError(
                f"{file} holds an array of shape {shape}; activations must be [rows, d]"
            )
        self.n_source_rows, self.d_model = int(shape[0]), int(shape[1])

        if labels is not None and not use_val_file:
            labels_file = Path(labels).expanduser()
            if not labels_file.is_file():
                raise HsaeError(f"dataset.labels={labels!r} is not a file")
            file_labels = np.load(labels_file)
        if file_labels is None:
            labels_nl = np.zeros((self.n_source_rows, 1), dtype=np.int64)
            self.hierarchy = Hierarchy(("all",), (("all",),), ((-1,),))
        else:
            labels_nl = np.asarray(file_labels)
            labels_nl = labels_nl[:, None] if labels_nl.ndim == 1 else labels_nl
            if (
                labels_nl.ndim != 2
                or len(labels_nl) != self.n_source_rows
                or labels_nl.dtype.kind not in "iu"
                or (labels_nl < 0).any()
            ):
                raise HsaeError(
                    f"labels for {file} must be non-negative integers of shape [{self.n_source_rows}]"
                    f" or [{self.n_source_rows}, levels]; got {labels_nl.dtype} {labels_nl.shape}"
                )
            labels_nl = labels_nl.astype(np.int64)
            self.hierarchy = _hierarchy_from_labels(labels_nl)
        self.labels_nl = labels_nl  # indexed by source row

        if use_val_file:
            rows = np.arange(self.n_source_rows)
        else:
            val = np.zeros(self.n_source_rows, dtype=bool)
            if val_path is None:  # hold out a seeded fraction of the rows
                n_val = max(1, round(val_fraction * self.n_source_rows))
                perm = np.random.default_rng([seed, 0xA11]).permutation(self.n_source_rows)
                val[perm[:n_val]] = True
            rows = np.flatnonzero(val if split == "val" else ~val)
        self.rows = rows[seeded_subset(len(rows), max_images, seed)]
        self.split = split
        self._describe = {
            "name": "activations",
            "split": split,
            "file": _sha256(self.file),
            "stem": self.file.stem,
            "key": key,
            "labels": hashlib.sha256(labels_nl.tobytes()).hexdigest()[:16],
            "rows": hashlib.sha256(self.rows.tobytes()).hexdigest()[:16],
            "n_rows": len(self.rows),
            "d_model": self.d_model,
            "version": 1,
        }

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict:
        return dict(self._describe)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 ``[len(rows), d]`` of sorted source rows."""
        if len(rows) == 0:
            return np.empty((0, self.d_model), dtype=np.float32)
        return self._read(np.asarray(rows, dtype=np.int64))
