"""Image datasets with labels at every level of a class hierarchy, and activation files.

A dataset here is a ``torch.utils.data.Dataset`` of ``(image, index)`` pairs with:
``hierarchy`` (the label tree), ``labels_nl`` (``[n_images, n_levels]`` labels),
``transform`` (set by the backbone to its own preprocessing), ``describe()`` (what
determines its contents, for cache keys) and ``image_name(i)`` (how to find the image
again). File datasets return an ``ImageError`` in place of an unreadable image
(``dataset.on_error=skip``). ``dataset=activations`` is not an image dataset but an
``ActivationArray``: rows copied into a cache without a backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hsae.config import DATASETS
from hsae.data.activations import ActivationArray
from hsae.data.cifar import Cifar100
from hsae.data.common import ImageError
from hsae.data.files import ImageFiles, make_hierarcaps, make_image_folder, make_imagenet
from hsae.data.synthetic import SyntheticShapes
from hsae.data.synthetic_tree import SyntheticTree
from hsae.errors import HsaeError

if TYPE_CHECKING:
    from hsae.config import DatasetConfig

__all__ = [
    "DATASETS",
    "ActivationArray",
    "Cifar100",
    "ImageError",
    "ImageFiles",
    "SyntheticShapes",
    "SyntheticTree",
    "make_dataset",
]


def make_dataset(cfg: DatasetConfig, split: str) -> Any:
    """The ``split`` (train | val) of the configured dataset, ``max_images`` applied."""
    if cfg.name in ("synthetic", "synthetic_tree"):
        n_images = {"train": cfg.n_train, "val": cfg.n_val}.get(split)
        if n_images is None:
            raise HsaeError(f"dataset={cfg.name} has splits train and val, not {split!r}")
        if cfg.max_images is not None:
            n_images = min(n_images, cfg.max_images)  # images are already random draws
        make = SyntheticShapes if cfg.name == "synthetic" else SyntheticTree
        return make(n_images, cfg.image_size, cfg.seed, split)
    if cfg.name == "image_folder":
        return make_image_folder(
            cfg.path,
            split,
            hierarchy_file=cfg.hierarchy,
            val_fraction=cfg.val_fraction,
            on_error=cfg.on_error,
            max_images=cfg.max_images,
            seed=cfg.seed,
        )
    if cfg.name == "imagenet":
        return make_imagenet(
            cfg.path, split, on_error=cfg.on_error, max_images=cfg.max_images, seed=cfg.seed
        )
    if cfg.name == "hierarcaps":
        return make_hierarcaps(
            cfg.path,
            split,
            val_fraction=cfg.val_fraction,
            on_error=cfg.on_error,
            max_images=cfg.max_images,
            seed=cfg.seed,
        )
    if cfg.name == "cifar100":
        return Cifar100(cfg.path, split, max_images=cfg.max_images, seed=cfg.seed)
    if cfg.name == "activations":
        return ActivationArray(
            cfg.path,
            split,
            val_path=cfg.val_path,
            labels=cfg.labels,
            key=cfg.key,
            val_fraction=cfg.val_fraction,
            max_images=cfg.max_images,
            seed=cfg.seed,
        )
    raise HsaeError(f"dataset.name={cfg.name!r} is not known; valid: {', '.join(DATASETS)}")
