"""Input checks shared by every step-1 and step-3 metric (``hsae.metrics.interp`` imports
them too): features, labels against the tree, levels, and the stratified split."""

from __future__ import annotations

import numpy as np
import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy

ArrayLike = torch.Tensor | np.ndarray


def as_features(feats_nd: ArrayLike, name: str = "features") -> torch.Tensor:
    """A float32 ``[n, d]`` tensor on the input's device; NaN/Inf and bad shapes raise."""
    feats = torch.as_tensor(feats_nd)
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.shape[1] == 0:
        raise HsaeError(
            f"{name} must be a non-empty 2-D [n, d] array, got shape {tuple(feats.shape)}; "
            "pool tokens per image (or pass one row per token) before calling"
        )
    feats = feats.float()
    # A finite sum means every entry is finite (NaN and Inf propagate), in one pass and no
    # [n, d] mask: at 50,000 x 24,576 latents the mask is 1.2 GB. A sum that overflows
    # falls through to the exact check.
    if not torch.isfinite(feats.sum()) and not torch.isfinite(feats).all():
        n_bad = int((~torch.isfinite(feats)).any(dim=1).sum())
        raise HsaeError(
            f"{name} contain NaN/Inf in {n_bad} rows; drop those rows or fix the activations "
            "that produced them (e.g. a float16 overflow: cache with dtype=float32)"
        )
    return feats


def as_labels(
    labels_nl: ArrayLike, hierarchy: Hierarchy, n_rows: int | None, device: torch.device
) -> torch.Tensor:
    """A long ``[n, n_levels]`` tensor on ``device``; checks range and parent consistency."""
    labels = torch.as_tensor(np.asarray(labels_nl) if isinstance(labels_nl, list) else labels_nl)
    if labels.ndim != 2 or labels.shape[1] != hierarchy.n_levels:
        raise HsaeError(
            f"labels must be [n, {hierarchy.n_levels}] (one column per level "
            f"{list(hierarchy.level_names)}), got shape {tuple(labels.shape)}"
        )
    if n_rows is not None and labels.shape[0] != n_rows:
        raise HsaeError(
            f"labels have {labels.shape[0]} rows but the features have {n_rows}; pass one "
            "label row per feature row (per image, or repeat per token)"
        )
    if labels.is_floating_point() and (
        not torch.isfinite(labels).all() or (labels != labels.round()).any()
    ):
        raise HsaeError("labels contain NaN or non-integer values; pass integer class ids")
    labels = labels.long().to(device)
    for level in range(hierarchy.n_levels):
        n_classes = hierarchy.n_classes(level)
        col = labels[:, level]
        if col.numel() and (col.min() < 0 or col.max() >= n_classes):
            raise HsaeError(
                f"labels at level {hierarchy.level_names[level]!r} must lie in "
                f"[0, {n_classes}), got [{int(col.min())}, {int(col.max())}]"
            )
        if level:
            parents = torch.as_tensor(hierarchy.parents[level], device=device)
            if (parents[col] != labels[:, level - 1]).any():
                raise HsaeError(
                    f"labels at level {hierarchy.level_names[level]!r} disagree with their "
                    "parents in the hierarchy; derive them with Hierarchy.labels_from_leaves"
                )
    return labels


def require_classes(labels_n: torch.Tensor, what: str, min_classes: int = 2) -> None:
    n_present = int(torch.unique(labels_n).numel())
    if n_present < min_classes:
        raise HsaeError(
            f"{what}: only {n_present} class(es) present, need at least {min_classes}; use more "
            "images (or a dataset split that covers the level), or skip this level"
        )


def level_index(hierarchy: Hierarchy, level: int | str) -> int:
    if isinstance(level, str):
        if level not in hierarchy.level_names:
            raise HsaeError(f"unknown level {level!r}; valid: {list(hierarchy.level_names)}")
        return hierarchy.level_names.index(level)
    n = hierarchy.n_levels
    if not -n <= level < n:
        raise HsaeError(f"level {level} out of range for a hierarchy with {n} levels")
    return level % n


def stratified_split(
    strata_n: ArrayLike, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test row indices with ``test_fraction`` of every stratum held out (deterministic
    by ``seed``); strata with one row go to train."""
    if not 0.0 < test_fraction < 1.0:
        raise HsaeError(f"test_fraction must be in (0, 1), got {test_fraction}")
    strata = np.asarray(torch.as_tensor(strata_n).cpu())
    rng = np.random.default_rng(seed)
    train, test = [], []
    for s in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == s))
        n_test = round(len(rows) * test_fraction) if len(rows) > 1 else 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(test_idx) == 0:
        raise HsaeError("train/test split left no test rows; pass more images per class")
    return train_idx, test_idx
