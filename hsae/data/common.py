"""Pieces every dataset shares: seeded subsets and splits, unreadable-image records."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from hsae.errors import HsaeError

SPLITS = ("train", "val")


class ImageError(NamedTuple):
    """Returned in place of an image that could not be read (``dataset.on_error=skip``)."""

    file: str  # path relative to the dataset root
    error: str  # the decoder's message


def check_split(dataset: str, split: str) -> None:
    if split not in SPLITS:
        raise HsaeError(f"dataset={dataset} has splits {', '.join(SPLITS)}, not {split!r}")


def seeded_subset(n: int, max_images: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``max_images`` of ``n`` (all when None).

    Sorted so that reads stay in file order; the same seed gives the same subset.
    """
    if max_images is None or max_images >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, 0x5EB5E7])
    return np.sort(rng.choice(n, size=max_images, replace=False))


def in_val_split(names: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: which items are held out for val, by a seeded hash of each name.

    A hash, not a shuffle, so an item stays in its split when files are added or removed.
    """

    def unit(name: str) -> float:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64

    return np.array([unit(name) < val_fraction for name in names], dtype=bool)


def split_mask(names: list[str], split: str, val_fraction: float, seed: int) -> np.ndarray:
    val = in_val_split(names, val_fraction, seed)
    return val if split == "val" else ~val
