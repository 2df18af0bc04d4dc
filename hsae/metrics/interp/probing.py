"""Sparse probing: how well the k best latents of a class detect it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
    balanced_accuracy,
    binary_probe_logits,
    class_means,
    fit_binary_probes,
    stratified_split,
)
from hsae.metrics.interp.top import _acts_and_labels


def mean_difference_latents(
    acts_nk: torch.Tensor, labels_n: torch.Tensor, n_classes: int, n_pick: int
) -> torch.Tensor:
    """``[n_classes, n_pick]``: for each class, the latents with the largest mean activation
    on the class minus the mean on every other image (SAE latents are non-negative, so a
    class detector is one that fires *more* on the class)."""
    means, _ = class_means(acts_nk, labels_n, n_classes)
    counts = torch.bincount(labels_n, minlength=n_classes).to(acts_nk.dtype)[:, None]
    total = acts_nk.sum(dim=0, keepdim=True)
    rest = (total - means * counts) / (len(labels_n) - counts).clamp_min(1)
    diff = means - rest
    return diff.topk(min(n_pick, acts_nk.shape[1]), dim=1).indices


def sparse_probing(
    acts_nk: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    ks: Sequence[int] = (1, 2, 5),
    test_fraction: float = 0.3,
    seed: int = 0,
    weight_decay: float = 1e-3,
    chunk: int = 64,
) -> dict[tuple[int, int], torch.Tensor]:
    """``{(level, k): [n_classes] balanced accuracy}``: for every class at every level, a
    one-vs-rest logistic probe (class-balanced) on the ``k`` latents chosen by class-mean
    difference on the training split, scored on the held-out split (stratified by leaf,
    deterministic by ``seed``). NaN for a class without positives in either split."""
    acts, labels = _acts_and_labels(acts_nk, labels_nl, hierarchy)
    if not ks or min(ks) < 1:
        raise HsaeError(f"sparse probing: ks must be positive latent counts, got {list(ks)}")
    train_idx, test_idx = stratified_split(labels[:, -1], test_fraction, seed)
    tr = torch.as_tensor(train_idx, device=acts.device)
    te = torch.as_tensor(test_idx, device=acts.device)
    acts_tr = acts[tr]
    out: dict[tuple[int, int], torch.Tensor] = {}
    for level in range(hierarchy.n_levels):
        n_classes = hierarchy.n_classes(level)
        y_tr_n, y_te_n = labels[tr, level], labels[te, level]
        chosen_cm = mean_difference_latents(acts_tr, y_tr_n, n_classes, max(ks))
        # The chosen latents' columns, gathered once per level and latent-major: picking
        # columns of the [n, n_latents] matrix per probe reads one entry per cache line.
        cols, local_cm = torch.unique(chosen_cm, return_inverse=True)  # chosen = cols[local]
        cols_tr = acts_tr[:, cols].T.contiguous()  # [n_chosen, n_train]
        cols_te = acts[te[:, None], cols[None, :]].T.contiguous()
        for k in ks:
            acc = torch.full((n_classes,), math.nan, dtype=torch.float64, device=acts.device)
            for start in range(0, n_classes, chunk):
                cls = torch.arange(start, min(start + chunk, n_classes), device=acts.device)
                pick = local_cm[cls, :k]  # [P, k] rows of cols_tr / cols_te
                y_tr = y_tr_n[None, :] == cls[:, None]
                y_te = y_te_n[None, :] == cls[:, None]
                ok = y_tr.any(1) & y_te.any(1) & (~y_tr).any(1)
                if not ok.any():
                    continue
                x_tr = cols_tr[pick].transpose(1, 2)  # [P, n_train, k]
                coef, icpt, standard = fit_binary_probes(x_tr, y_tr, weight_decay)
                x_te = cols_te[pick].transpose(1, 2)
                pred = binary_probe_logits(x_te, coef, icpt, standard) > 0
                acc[cls] = torch.where(ok, balanced_accuracy(pred, y_te), math.nan)
            out[(level, k)] = acc
    return out
