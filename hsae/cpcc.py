"""CPCC (Zeng et al. 2023): how far the geometry of class-mean features follows the label tree.

Over pairs of classes, the Pearson correlation between their tree distance
(``Hierarchy.class_distance``) and the Euclidean distance of their class-mean features.
It sits beside the pipeline (torch and errors only) because both ends use it: the stand-ins'
hierarchical objective and held-out check (``hsae.backbones.stand_in``) and step 1's
``hier/cpcc`` (``hsae.metrics.hierarchy``, which checks its inputs and calls this).
"""

from __future__ import annotations

import logging
import math

import torch

from hsae.errors import HsaeError

log = logging.getLogger(__name__)


def class_means(
    feats_nd: torch.Tensor, labels_n: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n_classes, d] means, [n_classes] bool present)``; absent classes' means are 0."""
    sums = feats_nd.new_zeros(n_classes, feats_nd.shape[1])
    sums.index_add_(0, labels_n, feats_nd)
    counts = torch.bincount(labels_n, minlength=n_classes).to(feats_nd.dtype)
    return sums / counts.clamp_min(1)[:, None], counts > 0


def cpcc_pairs(
    feats_nd: torch.Tensor,
    labels_n: torch.Tensor,
    tree_cc: torch.Tensor,
    smooth_eps: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tree_p, dist_p)``: for each pair of classes present in ``labels_n``, their tree
    distance (from ``tree_cc``, one row and column per class) and the Euclidean distance of
    their class means.

    ``smooth_eps=None`` measures: exact distances in float64. A float trains:
    ``sqrt(squared distance + smooth_eps)`` in the features' dtype, differentiable where two
    means meet (the gradient of ``sqrt`` at 0 is infinite)."""
    means, present = class_means(feats_nd, labels_n, tree_cc.shape[0])
    idx = torch.nonzero(present).squeeze(1)
    means = means[idx]
    iu = torch.triu_indices(len(idx), len(idx), offset=1, device=feats_nd.device)
    if smooth_eps is None:
        # cdist of the [c, c] matrix, not a [pairs, d] difference: c = 1,000 classes of
        # 768-d means would take 3 GB as differences.
        dist = torch.cdist(means.double(), means.double())[iu[0], iu[1]]
    else:
        dist = ((means[iu[0]] - means[iu[1]]).pow(2).sum(dim=1) + smooth_eps).sqrt()
    tree = tree_cc.to(feats_nd.device)[idx][:, idx][iu[0], iu[1]].to(dist.dtype)
    return tree, dist


def cpcc_of_classes(
    feats_nd: torch.Tensor, labels_n: torch.Tensor, tree_cc: torch.Tensor, what: str = "CPCC"
) -> float:
    """The measured CPCC of ``feats_nd`` grouped by ``labels_n``: 1 = the class geometry
    follows the tree, ~0 = unrelated; NaN when every pair of class means is equally far apart
    (collapsed to one point, say), where a correlation is undefined. Raises when the tree
    distances are all equal (``what`` names the measurement in the message)."""
    t, e = cpcc_pairs(feats_nd, labels_n, tree_cc)
    if not torch.isfinite(e).all():
        raise HsaeError(
            f"{what}: the features contain NaN/Inf; fix the activations that produced them "
            "(e.g. a float16 overflow, or a diverged training run)"
        )
    if len(t) < 3 or t.std() == 0:  # 3 pairs: 3 classes
        raise HsaeError(
            f"{what}: fewer than three classes present, or every pair of them has the same "
            "tree distance, so the correlation is undefined; use more images or a finer level"
        )
    if e.std() <= 1e-12 * e.abs().max().clamp_min(1e-300):
        # A correlation with a constant is undefined, not 0 ("measured: no tree structure").
        log.info("%s undefined (NaN): the class means are all equally far apart", what)
        return math.nan
    return float(torch.corrcoef(torch.stack([t, e]))[0, 1])
