"""The geometry of the features against the tree: CPCC of the class means (the computation
is ``hsae.cpcc``, shared with the stand-ins' objective) and Ward clustering's agreement with
each level (adjusted mutual information)."""

from __future__ import annotations

import numpy as np
import torch

from hsae.cpcc import cpcc_of_classes
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy.inputs import (
    ArrayLike,
    as_features,
    as_labels,
    level_index,
    require_classes,
)


def cpcc(
    feats_nd: ArrayLike, labels_nl: ArrayLike, hierarchy: Hierarchy, level: int | str = -1
) -> float:
    """CPCC (Zeng et al. 2023): Pearson correlation, over pairs of classes present at
    ``level``, between their tree distance (edges on the path through their LCA) and the
    Euclidean distance between their class-mean features. 1 = the representation's class
    geometry follows the tree; ~0 = unrelated; NaN when every pair of class means is equally
    far apart (e.g. they collapse to one point), where a correlation is undefined."""
    feats = as_features(feats_nd)
    labels = as_labels(labels_nl, hierarchy, feats.shape[0], feats.device)
    lvl = level_index(hierarchy, level)
    col = labels[:, lvl]
    what = f"CPCC at level {hierarchy.level_names[lvl]!r}"
    require_classes(col, what, 3)
    return cpcc_of_classes(feats, col, torch.as_tensor(hierarchy.class_distance(lvl)), what)


def clustering_ami(
    feats_nd: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    max_points: int = 4000,
    seed: int = 0,
) -> list[float]:
    """Ward agglomerative clustering of (at most ``max_points``, a seeded random subset of)
    the rows; one dendrogram, cut at each level's number of classes present; adjusted mutual
    information of each cut with that level's labels (1 = same partition, ~0 = chance)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.metrics import adjusted_mutual_info_score

    feats = as_features(feats_nd)
    labels = as_labels(labels_nl, hierarchy, feats.shape[0], feats.device)
    n = feats.shape[0]
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        feats, labels = feats[rows], labels[rows]
    x = feats.double().cpu().numpy()
    lab = labels.cpu().numpy()
    tree = linkage(x, method="ward")
    out = []
    for level, name in enumerate(hierarchy.level_names):
        n_clusters = len(np.unique(lab[:, level]))
        if n_clusters < 2:
            raise HsaeError(
                f"clustering AMI at level {name!r}: only one class among the {len(lab)} rows "
                "sampled; raise max_points or use more images"
            )
        cut = fcluster(tree, t=n_clusters, criterion="maxclust")
        out.append(float(adjusted_mutual_info_score(lab[:, level], cut)))
    return out
