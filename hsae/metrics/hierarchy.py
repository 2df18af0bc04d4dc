"""Step 1: how hierarchically consistent a representation is, given the label tree.

Every function takes features ``feats_nd`` (one row per image, e.g. a backbone's pooled
activations at one layer), labels ``labels_nl`` (one class per level, coarse to fine) and
the ``Hierarchy`` they come from. Tensors stay on the device they arrive on, so the same
calls run batched on a GPU. ``hierarchy_metrics`` returns every number under its documented
name (docs/metrics.md):

- ``hier/cpcc``: CPCC (Zeng et al. 2023), Pearson correlation between the tree distance of
  pairs of leaf classes and the Euclidean distance of their class-mean features.
- ``hier/probe_acc@<level>``, ``hier/full_path_acc``, ``hier/consistency``: linear probes,
  one per level, trained on a stratified split and scored on the held-out part.
- ``hier/mistake_severity``, ``hier/hdist@<k>`` (Bertinetto et al. 2020): height of the
  lowest common ancestor (LCA) of prediction and truth, from the leaf-level probe.
- ``hier/ami@<level>``: Ward clustering cut at each level's number of classes, adjusted
  mutual information with that level's labels.

The linear-probe trainers here (``fit_linear_probe``, ``fit_ovr_probes``,
``fit_binary_probes``) are shared with ``hsae.metrics.interp``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.results import Metrics

log = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray


# ---------------------------------------------------------------------------------------
# Input checks shared by every metric (interp.py imports these too)
# ---------------------------------------------------------------------------------------


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


def class_paths(hierarchy: Hierarchy, level: int) -> np.ndarray:
    """``[n_classes(level), level + 1]``: each class's ancestors at levels 0..level."""
    paths = np.empty((hierarchy.n_classes(level), level + 1), dtype=np.int64)
    paths[:, level] = np.arange(hierarchy.n_classes(level))
    for m in range(level, 0, -1):
        paths[:, m - 1] = np.asarray(hierarchy.parents[m])[paths[:, m]]
    return paths


def lca_height(pred_n: torch.Tensor, true_n: torch.Tensor, hierarchy: Hierarchy) -> torch.Tensor:
    """Height of the LCA of two leaves above the leaf level: 0 = same leaf, n_levels = root."""
    paths = torch.as_tensor(hierarchy.leaf_paths(), device=pred_n.device)
    same = (paths[pred_n] == paths[true_n]).long()
    return hierarchy.n_levels - same.cumprod(dim=-1).sum(dim=-1)


def _level_index(hierarchy: Hierarchy, level: int | str) -> int:
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


# ---------------------------------------------------------------------------------------
# Linear probes (batched torch; deterministic: zero init, full-batch L-BFGS / Newton)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearProbe:
    """``logits = ((x - mean) / scale) @ weight + bias``; one column per output."""

    weight_do: torch.Tensor
    bias_o: torch.Tensor
    mean_d: torch.Tensor
    scale_d: torch.Tensor

    def logits(self, feats_nd: torch.Tensor) -> torch.Tensor:
        return ((feats_nd - self.mean_d) / self.scale_d) @ self.weight_do + self.bias_o

    def direction_do(self) -> torch.Tensor:
        """Each output's weight vector in the raw (unstandardised) feature space."""
        return self.weight_do / self.scale_d[:, None]


def _fit_lbfgs(
    feats_nd: torch.Tensor,
    n_out: int,
    loss_of_logits: Callable[[torch.Tensor], torch.Tensor],
    weight_decay: float,
    max_iter: int,
) -> LinearProbe:
    mean = feats_nd.mean(dim=0)
    # Standardising makes one weight decay fit every feature scale; constant features keep
    # scale 1 so they contribute nothing instead of dividing by zero.
    scale = feats_nd.std(dim=0, unbiased=False)
    scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-12), scale, torch.ones_like(scale))
    x = (feats_nd - mean) / scale
    weight = torch.zeros(x.shape[1], n_out, device=x.device, requires_grad=True)
    bias = torch.zeros(n_out, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of_logits(x @ weight + bias) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, scale)


def fit_linear_probe(
    feats_nd: torch.Tensor,
    labels_n: torch.Tensor,
    n_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> LinearProbe:
    """Multinomial logistic regression (softmax over ``n_classes``) with L2 weight decay,
    trained full-batch with L-BFGS on standardised features."""
    labels = labels_n.to(feats_nd.device)
    return _fit_lbfgs(
        feats_nd, n_classes, lambda z: F.cross_entropy(z, labels), weight_decay, max_iter
    )


def fit_ovr_probes(
    feats_nd: torch.Tensor,
    targets_no: torch.Tensor,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
    balanced: bool = True,
) -> LinearProbe:
    """Independent binary logistic probes, one per column of ``targets_no`` (0/1), trained
    together (their losses do not interact). ``balanced`` weights positives and negatives
    equally per column so rare classes are not ignored."""
    y = targets_no.float().to(feats_nd.device)
    if balanced:
        pos = y.mean(dim=0).clamp(1e-6, 1 - 1e-6)
        w = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    else:
        w = torch.ones_like(y)
    return _fit_lbfgs(
        feats_nd,
        y.shape[1],
        lambda z: (
            F.binary_cross_entropy_with_logits(z, y, weight=w, reduction="sum")
            / (y.shape[0] * y.shape[1])
        ),
        weight_decay / y.shape[1],
        max_iter,
    )


def fit_binary_probes(
    x_pnk: torch.Tensor,
    y_pn: torch.Tensor,
    weight_decay: float = 1e-3,
    n_iter: int = 30,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``P`` independent class-balanced binary logistic regressions on few features each
    (``k`` small, e.g. a few SAE latents), solved together by batched Newton's method.

    Returns ``(coef_pk, intercept_p, (mean_pk, scale_pk))`` packed as coef, intercept and a
    ``[2, P, k]`` standardisation tensor; use ``binary_probe_logits`` to apply them.
    """
    x = x_pnk.double()
    y = y_pn.double()
    mean = x.mean(dim=1, keepdim=True)
    scale = x.std(dim=1, keepdim=True, unbiased=False)
    scale = torch.where(scale > 1e-9, scale, torch.ones_like(scale))
    xs = torch.cat([(x - mean) / scale, torch.ones_like(x[..., :1])], dim=-1)  # [P, n, k+1]
    pos = y.mean(dim=1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    w = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos)) / y.shape[1]  # sums to 1 per probe
    k1 = xs.shape[-1]
    reg = torch.full((k1,), weight_decay, dtype=x.dtype, device=x.device)
    reg[-1] = 0.0  # the intercept is not penalised
    beta = torch.zeros(x.shape[0], k1, dtype=x.dtype, device=x.device)
    eye = torch.eye(k1, dtype=x.dtype, device=x.device)
    xs_t = xs.transpose(1, 2)
    for _ in range(n_iter):
        p = torch.sigmoid((xs @ beta.unsqueeze(-1)).squeeze(-1))
        grad = (xs_t @ (w * (p - y)).unsqueeze(-1)).squeeze(-1) + reg * beta
        # Weighting xs in its own layout, not through the transposed view, halves the time.
        hess = xs_t @ (xs * (w * p * (1 - p)).unsqueeze(-1)) + torch.diag(reg)
        # A tiny ridge keeps the solve defined for a constant feature (all-zero latent).
        step = torch.linalg.solve(hess + 1e-9 * eye, grad.unsqueeze(-1)).squeeze(-1)
        beta = beta - step
        if float(step.abs().max()) < 1e-10:  # converged (Newton: quadratically)
            break
    standard = torch.stack([mean.squeeze(1), scale.squeeze(1)])
    return beta[:, :-1], beta[:, -1], standard


def binary_probe_logits(
    x_pnk: torch.Tensor, coef_pk: torch.Tensor, intercept_p: torch.Tensor, standard: torch.Tensor
) -> torch.Tensor:
    xs = (x_pnk.double() - standard[0][:, None, :]) / standard[1][:, None, :]
    return torch.einsum("pnk,pk->pn", xs, coef_pk) + intercept_p[:, None]


def balanced_accuracy(pred_pn: torch.Tensor, y_pn: torch.Tensor) -> torch.Tensor:
    """Mean of true-positive and true-negative rates, per row ``p``."""
    y = y_pn.bool()
    pred = pred_pn.bool()
    tpr = (pred & y).sum(1).double() / y.sum(1).clamp_min(1)
    tnr = (~pred & ~y).sum(1).double() / (~y).sum(1).clamp_min(1)
    return 0.5 * (tpr + tnr)


# ---------------------------------------------------------------------------------------
# CPCC
# ---------------------------------------------------------------------------------------


def class_means(
    feats_nd: torch.Tensor, labels_n: torch.Tensor, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n_classes, d] means, [n_classes] bool present)``."""
    sums = torch.zeros(n_classes, feats_nd.shape[1], device=feats_nd.device)
    sums.index_add_(0, labels_n, feats_nd)
    counts = torch.bincount(labels_n, minlength=n_classes).to(feats_nd.dtype)
    return sums / counts.clamp_min(1)[:, None], counts > 0


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
    lvl = _level_index(hierarchy, level)
    col = labels[:, lvl]
    require_classes(col, f"CPCC at level {hierarchy.level_names[lvl]!r}", 3)
    means, present = class_means(feats, col, hierarchy.n_classes(lvl))
    paths = torch.as_tensor(class_paths(hierarchy, lvl), device=feats.device)[present]
    means = means[present]
    same = (paths[:, None, :] == paths[None, :, :]).long().cumprod(dim=-1).sum(dim=-1)
    tree = (2 * (lvl + 1 - same)).double()
    dist = torch.cdist(means.double(), means.double())
    iu = torch.triu_indices(len(means), len(means), offset=1, device=feats.device)
    t, e = tree[iu[0], iu[1]], dist[iu[0], iu[1]]
    if t.std() == 0:
        raise HsaeError(
            f"CPCC at level {hierarchy.level_names[lvl]!r}: every pair of classes present has "
            "the same tree distance, so the correlation is undefined; use a finer level"
        )
    if e.std() <= 1e-12 * e.abs().max().clamp_min(1e-300):
        # Every class mean equally far from every other (collapsed to one point, say): a
        # correlation with a constant is undefined, not 0 ("measured: no tree structure").
        log.info("CPCC undefined (NaN): the class means are all equally far apart")
        return math.nan
    return float(torch.corrcoef(torch.stack([t, e]))[0, 1])


# ---------------------------------------------------------------------------------------
# Probe consistency, mistake severity, hierarchical distance@k
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Clustering agreement
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Everything under its documented name
# ---------------------------------------------------------------------------------------


def hierarchy_metrics(
    feats_nd: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    weight_decay: float = 1e-4,
    hdist_ks: Sequence[int] = (1, 5),
    ami_max_points: int = 4000,
) -> dict[str, float]:
    """Every step-1 metric of one representation, as a flat dict of documented names
    (``Metrics``: an undefined one is NaN, with its reason in ``.skipped``)."""
    feats = as_features(feats_nd)
    labels = as_labels(labels_nl, hierarchy, feats.shape[0], feats.device)
    names = hierarchy.level_names
    out = Metrics()
    out.set_or_undefined(
        "hier/cpcc",
        cpcc(feats, labels, hierarchy),
        "the class means are all equally far apart (collapsed to one point?), so their "
        "distances cannot correlate with the tree",
    )
    probes = probe_consistency(
        feats, labels, hierarchy, test_fraction=test_fraction, seed=seed, weight_decay=weight_decay
    )
    for name, acc in zip(names, probes.acc_l, strict=True):
        out[f"hier/probe_acc@{name}"] = acc
    out["hier/full_path_acc"] = probes.full_path_acc
    out["hier/consistency"] = probes.consistency
    out.set_or_undefined(
        "hier/mistake_severity",
        mistake_severity(probes.pred_nl[:, -1], probes.true_nl[:, -1], hierarchy),
        "the leaf probe made no mistakes on the held-out images",
    )
    for k in hdist_ks:
        if k <= hierarchy.n_leaves:
            out[f"hier/hdist@{k}"] = hierarchical_distance_at_k(
                probes.leaf_logits_nc, probes.true_nl[:, -1], hierarchy, k
            )
        else:
            out.undefined(
                f"hier/hdist@{k}", f"top-{k} needs >= {k} leaf classes; the tree has only "
                f"{hierarchy.n_leaves} leaves"
            )  # fmt: skip
    amis = clustering_ami(feats, labels, hierarchy, max_points=ami_max_points, seed=seed)
    for name, ami in zip(names, amis, strict=True):
        out[f"hier/ami@{name}"] = ami
    return out
