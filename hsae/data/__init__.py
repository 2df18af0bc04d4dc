"""Image datasets with labels at every level of a class hierarchy.

A dataset here is a ``torch.utils.data.Dataset`` of ``(image, index)`` pairs with:
``hierarchy`` (the label tree), ``labels_nl`` (``[n_images, n_levels]`` labels),
``transform`` (set by the backbone to its own preprocessing) and ``describe()`` (what
determines its contents, for cache keys).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsae.data.synthetic import SyntheticShapes
from hsae.errors import HsaeError

if TYPE_CHECKING:
    from hsae.config import DatasetConfig

DATASETS = ("synthetic",)


def make_dataset(cfg: DatasetConfig, split: str) -> SyntheticShapes:
    if cfg.name == "synthetic":
        n_images = {"train": cfg.n_train, "val": cfg.n_val}.get(split)
        if n_images is None:
            raise HsaeError(f"dataset=synthetic has splits train and val, not {split!r}")
        if cfg.max_images is not None:
            n_images = min(n_images, cfg.max_images)
        return SyntheticShapes(n_images, cfg.image_size, cfg.seed, split)
    raise HsaeError(f"dataset.name={cfg.name!r} is not known; valid: {', '.join(DATASETS)}")
