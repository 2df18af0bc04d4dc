"""Per-level predictions scored against the tree: probe accuracy, full-path accuracy and
path consistency; mistake severity and hierarchical distance@k (Bertinetto et al. 2020)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy.inputs import (
    ArrayLike,
    as_features,
    as_labels,
    require_classes,
    stratified_split,
)
from hsae.metrics.hierarchy.probes import fit_linear_probe

log = logging.getLogger(__name__)


def lca_height(pred_n: torch.Tensor, true_n: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """Height of the LCA of two leaves above the leaf level: 0 = same leaf, n_levels = root."""
    paths = torch.as_tensor(hierarchy.leaf_paths(), device=pred_n.device)
    same = (paths[pred_n] == paths[true_n]).long()
    return hierarchy.n_levels - same.cumprod(dim=-1).sum(dim=-1)


@dataclass(frozen=True)
class ProbeResult:
    """Per-level linear probes scored on held-out rows."""

    acc_l: list[float]
    """Accuracy of each level's probe, coarse to fine."""
    full_path_acc: float
    """Fraction of test rows right at every level."""
    consistency: float
    """Fraction of test rows whose per-level predictions form a path of the tree (each
    level's prediction is the parent of the next level's); with two levels this is
    "parent of the fine prediction = the coarse prediction"."""
    pred_nl: torch.Tensor
    """Test predictions ``[n_test, n_levels]``."""
    true_nl: torch.Tensor
    """Test labels ``[n_test, n_levels]``."""
    leaf_logits_nc: torch.Tensor
    """The leaf-level probe's logits on the test rows (for top-k metrics)."""


def probe_consistency(
    feats_nd: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    test_fraction: float = 0.3,
    seed: int = 0,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> ProbeResult:
    """A multinomial logistic probe per level on frozen features, trained on a split
    stratified by leaf class (deterministic by ``seed``), scored on the held-out rows."""
    feats = as_features(feats_nd)
    labels = as_labels(labels_nl, hierarchy, feats.shape[0], feats.device)
    for level, name in enumerate(hierarchy.level_names):
        require_classes(labels[:, level], f"probe at level {name!r}")
    train_idx, test_idx = stratified_split(labels[:, -1], test_fraction, seed)
    tr = torch.as_tensor(train_idx, device=feats.device)
    te = torch.as_tensor(test_idx, device=feats.device)
    preds, acc, leaf_logits = [], [], None
    for level in range(hierarchy.n_levels):
        probe = fit_linear_probe(
            feats[tr], labels[tr, level], hierarchy.n_classes(level), weight_decay, max_iter
        )
        logits = probe.logits(feats[te])
        pred = logits.argmax(dim=1)
        preds.append(pred)
        acc.append(float((pred == labels[te, level]).float().mean()))
        leaf_logits = logits
    pred_nl = torch.stack(preds, dim=1)
    true_nl = labels[te]
    assert leaf_logits is not None
    return ProbeResult(
        acc_l=acc,
        full_path_acc=float((pred_nl == true_nl).all(dim=1).float().mean()),
        consistency=path_consistency(pred_nl, hierarchy),
        pred_nl=pred_nl,
        true_nl=true_nl,
        leaf_logits_nc=leaf_logits,
    )


def path_consistency(pred_nl: torch.Tensor, hierarchy: Hierarchy) -> float:
    """Fraction of rows whose per-level predictions form a path of the tree: the prediction
    at every level is the parent of the prediction at the next level."""
    pred = torch.as_tensor(pred_nl).long()
    if pred.ndim != 2 or pred.shape[1] != hierarchy.n_levels:
        raise HsaeError(
            f"predictions must be [n, {hierarchy.n_levels}] (one per level), got {tuple(pred.shape)}"
        )
    valid = torch.ones(len(pred), dtype=torch.bool, device=pred.device)
    for level in range(1, hierarchy.n_levels):
        parents = torch.as_tensor(hierarchy.parents[level], device=pred.device)
        valid &= parents[pred[:, level]] == pred[:, level - 1]
    return float(valid.float().mean())


def mistake_severity(pred_leaf_n: ArrayLike, true_leaf_n: ArrayLike, hierarchy: Hierarchy) -> float:
    """Bertinetto et al. (2020): mean height of the LCA of predicted and true leaf over the
    mistakes only (1 = a sibling, ``n_levels`` = only the root in common). NaN when there are
    no mistakes (the severity of no mistakes is undefined, not zero)."""
    pred = torch.as_tensor(pred_leaf_n).long()
    true = torch.as_tensor(true_leaf_n).long().to(pred.device)
    if pred.shape != true.shape or pred.ndim != 1:
        raise HsaeError(
            f"mistake_severity: predictions {tuple(pred.shape)} and truth {tuple(true.shape)} "
            "must be equal-length 1-D leaf indices"
        )
    wrong = pred != true
    if not wrong.any():
        log.info("mistake_severity: no mistakes, severity undefined (NaN)")
        return math.nan
    return float(lca_height(pred[wrong], true[wrong], hierarchy).double().mean())


def hierarchical_distance_at_k(
    scores_nc: ArrayLike, true_leaf_n: ArrayLike, hierarchy: Hierarchy, k: int
) -> float:
    """Bertinetto et al. (2020) hierarchical distance@k: mean LCA height between the truth
    and each of the ``k`` highest-scoring leaves, over all rows (correct ones count 0)."""
    scores = torch.as_tensor(scores_nc).float()
    true = torch.as_tensor(true_leaf_n).long().to(scores.device)
    if scores.ndim != 2 or scores.shape[1] != hierarchy.n_leaves or len(true) != len(scores):
        raise HsaeError(
            f"hdist@k: scores must be [n, {hierarchy.n_leaves}] (one per leaf) with one label "
            f"per row, got {tuple(scores.shape)} and {tuple(true.shape)}"
        )
    if not 1 <= k <= hierarchy.n_leaves:
        raise HsaeError(f"hdist@k: k={k} must be in [1, {hierarchy.n_leaves}]")
    top = scores.topk(k, dim=1).indices
    heights = lca_height(top, true[:, None].expand_as(top), hierarchy)
    return float(heights.double().mean())
