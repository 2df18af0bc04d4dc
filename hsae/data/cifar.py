"""CIFAR-100 from torchvision's on-disk format: fine labels under the 20 coarse superclasses.

``dataset.path`` is the root torchvision downloads to (``torchvision.datasets.CIFAR100(root,
download=True)`` once, on a machine with internet access): it holds ``cifar-100-python/``
with the ``train``, ``test`` and ``meta`` pickles. hsae reads the pickles itself because
torchvision's class drops the coarse labels. The val split is CIFAR's test set.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hsae.data.common import check_split, seeded_subset
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.rundir import sha256_file

FOLDER = "cifar-100-python"
FILES = {"train": "train", "val": "test"}


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _sha256(path: Path) -> str:
    return sha256_file(path)[:16]  # short: it names the file in a cache key


def _hierarchy(folder: Path) -> Hierarchy:
    """Superclass -> class, from the meta names and the (fine, coarse) pairs in the data."""
    meta = _unpickle(folder / "meta")
    fine_names, coarse_names = meta["fine_label_names"], meta["coarse_label_names"]
    parent = np.full(len(fine_names), -1, dtype=np.int64)
    for file in FILES.values():
        if not (folder / file).exists():
            continue
        entry = _unpickle(folder / file)
        fine, coarse = np.asarray(entry["fine_labels"]), np.asarray(entry["coarse_labels"])
        for f, c in set(zip(fine.tolist(), coarse.tolist(), strict=True)):
            if parent[f] not in (-1, c):
                raise HsaeError(
                    f"{folder}: class {fine_names[f]!r} has two superclasses; the files are corrupt"
                )
            parent[f] = c
    if (parent < 0).any():
        missing = [fine_names[i] for i in np.flatnonzero(parent < 0)]
        raise HsaeError(f"{folder}: no images of classes {missing[:5]}, so no superclass for them")
    return Hierarchy(
        level_names=("superclass", "class"),
        class_names=(tuple(coarse_names), tuple(fine_names)),
        parents=(tuple([-1] * len(coarse_names)), tuple(parent.tolist())),
    )


class Cifar100(Dataset):
    """``(image [3, 32, 32] float in [0, 1], index)``; labels ``[n, 2]`` (superclass, class)."""

    def __init__(self, root: str | None, split: str, max_images: int | None = None, seed: int = 0):
        check_split("cifar100", split)
        if root is None:
            raise HsaeError("dataset=cifar100 needs dataset.path=<folder holding cifar-100-python>")
        folder = Path(root).expanduser() / FOLDER
        file = folder / FILES[split]
        if not file.is_file() or not (folder / "meta").is_file():
            raise HsaeError(
                f"no CIFAR-100 at {folder} (need {FILES[split]} and meta). Fix: run "
                f"torchvision.datasets.CIFAR100({str(root)!r}, download=True) once on a machine "
                "with internet access, or point dataset.path at the folder that holds "
                f"{FOLDER}/"
            )
        self.hierarchy = _hierarchy(folder)
        entry = _unpickle(file)
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        fine = np.asarray(entry["fine_labels"], dtype=np.int64)
        keep = seeded_subset(len(data), max_images, seed)
        self.images_n3hw, self.split = data[keep], split
        self.source_index = keep  # position in CIFAR's own file, for finding the image again
        self.labels_nl = self.hierarchy.labels_from_leaves(fine[keep])
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._describe = {
            "name": "cifar100",
            "split": split,
            "n_images": len(keep),
            "max_images": max_images,
            "seed": seed,
            "file": _sha256(file),
            "version": 1,
        }

    def __len__(self) -> int:
        return len(self.images_n3hw)

    def describe(self) -> dict:
        return dict(self._describe)

    def image_name(self, i: int) -> str:
        return f"{FILES[self.split]}/{self.source_index[i]}"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images_n3hw[i]).float() / 255
        if self.transform is not None:
            image = self.transform(image)
        return image, i
