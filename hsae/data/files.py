"""Datasets of image files: ``image_folder``, ``imagenet`` and ``hierarcaps``.

- ``image_folder``: ``path/<class>/**/<image>``, or ``path/train/<class>/...`` and
  ``path/val/<class>/...``. Without split subfolders, a seeded ``val_fraction`` of the files
  (chosen by a hash of each file's path) is the val split. An optional hierarchy file maps
  each class folder to its ancestors (see ``load_ancestors``); without one the classes are
  a single level.
- ``imagenet``: ``path/train/<wnid>/*.JPEG`` and ``path/val/<wnid>/*.JPEG`` (val sorted into
  synset folders, as the devkit's scripts do), labelled with the WordNet hierarchy shipped in
  ``hsae/data/imagenet_hierarchy.json`` (made by ``scripts/make_imagenet_hierarchy.py``).
- ``hierarcaps``: the flat folder of HierarCaps test photos; labelled by the coarsest caption
  of each image's chain when ``hierarcaps_test.csv`` sits beside the folder.

Images are decoded with PIL when read. An unreadable file is returned as an ``ImageError``
(``on_error=skip``: the cache skips, counts and lists it) or raises naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import Dataset

from hsae.data.common import ImageError, check_split, seeded_subset, split_mask
from hsae.data.hierarcaps import load_hierarcaps
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
IMAGENET_HIERARCHY = Path(__file__).parent / "imagenet_hierarchy.json"


def _scan_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted, by extension."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f
            for f in filenames
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        )
    return sorted(found)


def _class_folders(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _existing_dir(path: str | None, what: str) -> Path:
    if path is None:
        raise HsaeError(f"dataset={what} needs dataset.path=<folder>")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HsaeError(f"dataset.path={path!r} is not a folder (dataset={what})")
    return root.resolve()


class ImageFiles(Dataset):
    """``(image, index)`` pairs from a list of files; labels at every hierarchy level.

    ``image`` is a PIL image passed through ``transform`` when it is set (the backbone's
    preprocessing), else a ``[3, H, W]`` float tensor in [0, 1].
    """

    captions: list[list[str]] | None = None  # hierarcaps: each image's caption chain

    def __init__(
        self,
        name: str,
        root: Path,
        files: list[Path],
        leaves_n: np.ndarray,
        hierarchy: Hierarchy,
        split: str,
        *,
        max_images: int | None = None,
        seed: int = 0,
        on_error: str = "skip",
        extra: dict[str, Any] | None = None,
    ):
        if not files:
            raise HsaeError(f"dataset={name}: no image files for split {split!r} under {root}")
        keep = seeded_subset(len(files), max_images, seed)
        self.name, self.root, self.split, self.hierarchy = name, root, split, hierarchy
        self.files = [files[i] for i in keep]
        self.labels_nl = hierarchy.labels_from_leaves(np.asarray(leaves_n)[keep])
        self.on_error = on_error
        self.transform: Callable[[Any], torch.Tensor] | None = None
        self._describe = {
            "name": name,
            "split": split,
            "n_images": len(self.files),
            "max_images": max_images,
            "seed": seed,
            # The key covers which files (paths and sizes) and their labels, not where the
            # data lives, so moving the dataset keeps its caches.
            "files": self._files_digest(),
            "hierarchy": hashlib.sha256(
                json.dumps(hierarchy.to_dict(), sort_keys=True).encode()
            ).hexdigest()[:16],
            "version": 1,
            **(extra or {}),
        }

    def _files_digest(self) -> str:
        digest = hashlib.sha256()
        for file, labels in zip(self.files, self.labels_nl, strict=True):
            size = file.stat().st_size if file.exists() else -1
            digest.update(f"{self.image_name_of(file)}\t{size}\t{labels.tolist()}\n".encode())
        return digest.hexdigest()[:16]

    def image_name_of(self, file: Path) -> str:
        return file.relative_to(self.root).as_posix()

    def image_name(self, i: int) -> str:
        return self.image_name_of(self.files[i])

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> dict:
        """Everything that determines the images and labels (goes into cache keys)."""
        return dict(self._describe)

    def load(self, i: int) -> Image.Image | ImageError:
        file = self.files[i]
        try:
            with Image.open(file) as image:
                return image.convert("RGB")  # decodes fully: truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if self.on_error == "raise":
                raise HsaeError(
                    f"cannot read image {file}: {e}. Fix: replace or delete the file, or set "
                    "dataset.on_error=skip to skip unreadable images (listed in the manifest)"
                ) from e
            return ImageError(self.image_name(i), f"{type(e).__name__}: {e}")

    def __getitem__(self, i: int) -> tuple[torch.Tensor | ImageError, int]:
        image = self.load(i)
        if isinstance(image, ImageError):
            return image, i
        if self.transform is not None:
            return self.transform(image), i
        return TF.to_dtype(TF.to_image(image), torch.float32, scale=True), i


# ---- image_folder --------------------------------------------------------------------


def load_ancestors(path: str | Path, classes: list[str]) -> Hierarchy:
    """The hierarchy of ``classes`` from a JSON or YAML file::

        levels: [domain, group, class]   # coarse to fine; the last is the class folders
        ancestors:                       # each class folder -> its ancestors, coarse to fine
          beagle: [animal, dog]
          tabby: [animal, cat]

    Classes keep the folders' sorted order (the leaf index is the class index); ancestors
    are told apart by their whole path, so two groups may share a name under different parents.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise HsaeError(f"dataset.hierarchy={str(path)!r} is not a file")
    text = file.read_text()
    if file.suffix == ".json":
        spec = json.loads(text)
    else:
        import yaml

        spec = yaml.safe_load(text)
    if not isinstance(spec, dict) or "levels" not in spec or "ancestors" not in spec:
        raise HsaeError(
            f"hierarchy file {file} needs two keys: levels (names, coarse to fine) and "
            "ancestors (class folder -> list of its ancestors, coarse to fine)"
        )
    levels, ancestors = list(spec["levels"]), dict(spec["ancestors"])
    missing = [c for c in classes if c not in ancestors]
    if missing:
        raise HsaeError(
            f"hierarchy file {file} has no ancestors for class folders {missing[:10]} "
            f"({len(missing)} in all); add them under 'ancestors'"
        )
    for c in classes:
        if len(ancestors[c]) != len(levels) - 1:
            raise HsaeError(
                f"hierarchy file {file}: class {c!r} has {len(ancestors[c])} ancestors, but "
                f"levels {levels} need {len(levels) - 1} (every class at the same depth)"
            )
    class_names: list[list[str]] = [[] for _ in levels]
    parents: list[list[int]] = [[] for _ in levels]
    paths = {c: (*map(str, ancestors[c]), c) for c in classes}
    for level in range(len(levels) - 1):
        prefixes = sorted({p[: level + 1] for p in paths.values()})
        index_above = (
            {prefix: i for i, prefix in enumerate(sorted({p[:level] for p in paths.values()}))}
            if level
            else {}
        )
        names = [prefix[-1] for prefix in prefixes]
        for prefix in prefixes:
            name = prefix[-1]
            class_names[level].append(name if names.count(name) == 1 else f"{name} ({prefix[-2]})")
            parents[level].append(index_above[prefix[:-1]] if level else -1)
    last = len(levels) - 1
    above = (
        {prefix: i for i, prefix in enumerate(sorted({p[:last] for p in paths.values()}))}
        if last
        else {}
    )
    for c in classes:
        class_names[last].append(c)
        parents[last].append(above[paths[c][:last]] if last else -1)
    return Hierarchy(
        level_names=tuple(levels),
        class_names=tuple(tuple(n) for n in class_names),
        parents=tuple(tuple(p) for p in parents),
    )


def _split_root(root: Path, split: str) -> Path | None:
    """``root/split`` when the folder has split subfolders, None when it has none."""
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / split
    return None


def make_image_folder(
    path: str | None,
    split: str,
    *,
    hierarchy_file: str | None = None,
    val_fraction: float = 0.1,
    max_images: int | None = None,
    seed: int = 0,
    on_error: str = "skip",
) -> ImageFiles:
    check_split("image_folder", split)
    root = _existing_dir(path, "image_folder")
    split_root = _split_root(root, split)
    base = split_root or root
    classes = _class_folders(base)
    if not classes:
        raise HsaeError(
            f"dataset.path={path!r} has no class subfolders; image_folder expects "
            "<path>/<class>/<images> (or <path>/train/<class>/... and <path>/val/<class>/...)"
        )
    files: list[Path] = []
    leaves: list[int] = []
    for c, name in enumerate(classes):
        found = _scan_images(base / name)
        files.extend(found)
        leaves.extend([c] * len(found))
    leaves_n = np.asarray(leaves, dtype=np.int64)
    if split_root is None:  # no split folders: a seeded, hashed hold-out
        names = [f.relative_to(root).as_posix() for f in files]
        mask = split_mask(names, split, val_fraction, seed)
        files, leaves_n = [f for f, m in zip(files, mask, strict=True) if m], leaves_n[mask]
    hierarchy = (
        load_ancestors(hierarchy_file, classes)
        if hierarchy_file
        else Hierarchy(("class",), (tuple(classes),), (tuple([-1] * len(classes)),))
    )
    extra = {} if split_root else {"val_fraction": val_fraction}
    return ImageFiles(
        "image_folder",
        root,
        files,
        leaves_n,
        hierarchy,
        split,
        max_images=max_images,
        seed=seed,
        on_error=on_error,
        extra=extra,
    )


# ---- imagenet ------------------------------------------------------------------------


def imagenet_hierarchy() -> tuple[Hierarchy, list[str]]:
    """The shipped WordNet hierarchy of the 1,000 classes and the leaves' synset ids."""
    data = json.loads(IMAGENET_HIERARCHY.read_text())
    return Hierarchy.from_dict(data), list(data["wnids"][-1])


def make_imagenet(
    path: str | None,
    split: str,
    *,
    max_images: int | None = None,
    seed: int = 0,
    on_error: str = "skip",
) -> ImageFiles:
    check_split("imagenet", split)
    root = _existing_dir(path, "imagenet")
    split_root = root / split
    if not split_root.is_dir():
        raise HsaeError(
            f"dataset=imagenet: no {split_root}; dataset.path must hold train/ and val/, each "
            "with one folder per synset (n01440764/...)"
        )
    hierarchy, wnids = imagenet_hierarchy()
    leaf_of = {wnid: i for i, wnid in enumerate(wnids)}
    folders = _class_folders(split_root)
    unknown = [f for f in folders if f not in leaf_of]
    if unknown:
        raise HsaeError(
            f"dataset=imagenet: {split_root} has folders that are not ImageNet-1k synsets: "
            f"{unknown[:5]} ({len(unknown)} in all). The val split must be sorted into synset "
            "folders (val/n01440764/ILSVRC2012_val_00000293.JPEG ...)"
        )
    files: list[Path] = []
    leaves: list[int] = []
    for wnid in folders:
        found = _scan_images(split_root / wnid)
        files.extend(found)
        leaves.extend([leaf_of[wnid]] * len(found))
    return ImageFiles(
        "imagenet",
        root,
        files,
        np.asarray(leaves, dtype=np.int64),
        hierarchy,
        split,
        max_images=max_images,
        seed=seed,
        on_error=on_error,
    )


# ---- hierarcaps ----------------------------------------------------------------------

HIERARCAPS_CSV = "hierarcaps_test.csv"


def make_hierarcaps(
    path: str | None,
    split: str,
    *,
    val_fraction: float = 0.1,
    max_images: int | None = None,
    seed: int = 0,
    on_error: str = "skip",
) -> ImageFiles:
    """HierarCaps photos; label = the coarsest caption of each image's 4-caption chain."""
    check_split("hierarcaps", split)
    root = _existing_dir(path, "hierarcaps")
    files = _scan_images(root)
    names = [f.relative_to(root).as_posix() for f in files]
    csv_path = root.parent / HIERARCAPS_CSV
    if csv_path.is_file():
        data = load_hierarcaps(csv_path, root, check_images=False)
        chains = {
            p.name: list(chain) for p, chain in zip(data.image_paths, data.chains, strict=True)
        }
        concepts = [chains[n][0] if n in chains else "(no caption)" for n in names]
    else:
        chains, concepts = {}, ["image"] * len(files)
    classes = sorted(set(concepts))
    leaves = np.asarray([classes.index(c) for c in concepts], dtype=np.int64)
    mask = split_mask(names, split, val_fraction, seed)
    hierarchy = Hierarchy(("concept",), (tuple(classes),), (tuple([-1] * len(classes)),))
    dataset = ImageFiles(
        "hierarcaps",
        root,
        [f for f, m in zip(files, mask, strict=True) if m],
        leaves[mask],
        hierarchy,
        split,
        max_images=max_images,
        seed=seed,
        on_error=on_error,
        extra={"val_fraction": val_fraction},
    )
    # The caption chains (general -> specific) for the joint image-text metrics.
    dataset.captions = [chains.get(dataset.image_name(i), []) for i in range(len(dataset))]
    return dataset
