"""Feature absorption: parent-class latents that stop firing where a child latent fires."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
    class_means,
    fit_ovr_probes,
)
from hsae.metrics.interp.top import _acts_and_labels
from hsae.metrics.results import Metrics


def sibling_difference_latents(
    acts_nk: torch.Tensor, labels_nl: torch.Tensor, hierarchy: Hierarchy, level: int, n_pick: int
) -> torch.Tensor:
    """``[n_classes, n_pick]``: for each class at ``level``, the latents with the largest
    mean activation on the class minus the mean on its siblings' images (the classes that
    share its parent); at the top level, minus the mean on every other image. Against every
    other image, an ancestor's latent (firing on all the class's images and on few others)
    can beat the class's own."""
    col = labels_nl[:, level]
    n_classes = hierarchy.n_classes(level)
    means, _ = class_means(acts_nk, col, n_classes)
    counts = torch.bincount(col, minlength=n_classes).to(acts_nk.dtype)[:, None]
    if level == 0:
        group_sum, group_count = acts_nk.sum(dim=0, keepdim=True), float(len(col))
    else:
        up = torch.as_tensor(hierarchy.parents[level], device=acts_nk.device)  # class -> parent
        parent_means, _ = class_means(
            acts_nk, labels_nl[:, level - 1], hierarchy.n_classes(level - 1)
        )
        parent_counts = torch.bincount(
            labels_nl[:, level - 1], minlength=hierarchy.n_classes(level - 1)
        )
        group_count = parent_counts.to(acts_nk.dtype)[up][:, None]
        group_sum = parent_means[up] * group_count
    rest = (group_sum - means * counts) / (group_count - counts).clamp_min(1)
    return (means - rest).topk(min(n_pick, acts_nk.shape[1]), dim=1).indices


def _without_ancestors(
    direction_dp: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
    hierarchy: Hierarchy, level: int,
) -> torch.Tensor:  # fmt: skip
    """Each parent's unit probe direction minus its part along its ancestors' class-mean
    directions (mean of the ancestor's images minus the mean of the rest), renormalised.
    A shape's probe leans on its family's direction too; the family's latent, firing where
    the shape's latent misses, is the ancestor's feature, not an absorber."""
    if level == 0:
        return direction_dp
    feats = feats.float()
    total, n = feats.sum(dim=0), feats.shape[0]
    # The first image of each parent gives its ancestors (labels follow the tree).
    first = torch.full((hierarchy.n_classes(level),), 0, dtype=torch.long, device=feats.device)
    first.scatter_(0, labels[:, level].flip(0), torch.arange(n, device=feats.device).flip(0))
    anc_dirs = []
    for lv in range(level):
        n_lv = hierarchy.n_classes(lv)
        sums = torch.zeros(n_lv, feats.shape[1], device=feats.device)
        sums.index_add_(0, labels[:, lv], feats)
        counts = torch.bincount(labels[:, lv], minlength=n_lv).float()[:, None]
        diff = sums / counts.clamp_min(1) - (total - sums) / (n - counts).clamp_min(1)
        anc_dirs.append(diff[labels[first, lv]])  # [P, d]
    basis, _ = torch.linalg.qr(torch.stack(anc_dirs, dim=2))  # [P, d, level], orthonormal
    v_pd = direction_dp.T
    v_pd = v_pd - torch.einsum("pdl,pl->pd", basis, torch.einsum("pdl,pd->pl", basis, v_pd))
    return F.normalize(v_pd, dim=1).T


@dataclass(frozen=True)
class AbsorptionResult:
    level: int
    """The parents' level."""
    parent_latents_pm: torch.Tensor
    """Each parent class's own latents (class-mean difference), ``[n_parents, m]``."""
    rate_p: torch.Tensor
    """Per parent: absorbed images / images of the parent the probe detects."""
    false_negative_p: torch.Tensor
    """Per parent: images where the parent's latents miss and no latent absorbs it /
    images of the parent the probe detects."""
    fraction_p: torch.Tensor
    """Per parent: mean absorption fraction (SAEBench's, with partial absorption) over the
    detected images."""
    n_detected_p: torch.Tensor
    """Per parent: images of the parent (child-class images) the probe detects."""


def absorption(
    acts_nk: ArrayLike,
    feats_nd: ArrayLike,
    decoder_kd: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    level: int = 0,
    n_parent_latents: int = 1,
    fire_threshold: float = 0.0,
    min_cosine: float = 0.025,
    min_share: float = 0.4,
    fraction_min_cosine: float = 0.1,
    max_absorbers: int = 3,
    weight_decay: float = 1e-4,
    chunk: int = 1024,
) -> AbsorptionResult:
    """Feature absorption (Chanin et al. 2024, as SAEBench computes it) for every class
    ``p`` at ``level`` (a *parent*: its images are the images of its child classes).

    1. Probe: a class-balanced one-vs-rest logistic probe for ``p`` on the SAE's input
       features ``feats_nd``; its weight vector in feature space, unit-normalised, is the
       parent direction ``v_p``, less its part along ``p``'s ancestors' class-mean
       directions (a shape's probe leans on its family, whose latent is not an absorber).
       The probe *detects* ``p`` on an image of ``p`` when its
       logit is > 0 and the image's *probe projection* ``P = x . v_p - mean_{images not of
       p}(x . v_p)`` is > 0 (measured from the images without ``p``, so a mean offset of
       the features that no latent carries does not count).
    2. Parent latents ``S_p``: the ``n_parent_latents`` latents with the largest mean
       activation on ``p`` minus the mean on ``p``'s siblings (the other classes under its
       own parent; every other image at the top level): what tells ``p`` apart, not what
       ``p`` shares with its siblings (the family's latent fires on every shape of the
       family). They *miss* an image when every one is ``<= fire_threshold``.
    3. Latent ``j`` contributes ``c_j = a_j (d_j . v_p)`` to the projection (``d_j`` its
       decoder row) and is aligned with the probe by ``cos(d_j, v_p)``.
    4. A detected image is *absorbed* when the parent latents miss and the latent with the
       largest ``c_j`` has ``cos(d_j, v_p) >= min_cosine`` and ``c_j >= min_share * P``: a
       latent that fires carries the parent's direction in place of the parent's own. A miss
       without such a latent is a *false negative* (the parent latent is just unreliable).
    5. Absorption fraction (SAEBench, Till): with ``M = sum_{j in S_p} c_j`` and ``A`` the sum
       of the ``max_absorbers`` largest positive ``c_j`` outside ``S_p`` with
       ``cos >= fraction_min_cosine``: 0 when ``M >= P`` or ``A < min_share * P``, 1 when
       ``M <= 0``, else ``min(A, P - M) / (min(A, P - M) + M)``.

    ``rate_p``, ``false_negative_p``: absorbed, missed-unabsorbed / detected images of ``p``;
    ``fraction_p``: mean fraction over them. Defaults are SAEBench's (``min_cosine`` 0.025,
    ``min_share`` 0.4, ``fraction_min_cosine`` 0.1, 3 absorbers). All are 0 for an SAE whose
    parent latent fires wherever the parent is present; a clean child latent does not absorb,
    since the probe leans on it for a small share of ``P`` only.
    """
    acts, labels = _acts_and_labels(acts_nk, labels_nl, hierarchy)
    feats = as_features(feats_nd).to(acts.device)
    decoder = as_features(decoder_kd, "decoder").to(acts.device)
    if feats.shape[0] != acts.shape[0]:
        raise HsaeError(
            f"features have {feats.shape[0]} rows, activations {acts.shape[0]}; pass the SAE "
            "inputs of the same images, in the same order"
        )
    if decoder.shape != (acts.shape[1], feats.shape[1]):
        raise HsaeError(
            f"decoder must be [n_latents={acts.shape[1]}, d={feats.shape[1]}] (one row per "
            f"latent, in feature space), got {tuple(decoder.shape)}"
        )
    if not 0 <= level < hierarchy.n_levels:
        raise HsaeError(f"absorption level {level} out of range [0, {hierarchy.n_levels})")
    if not 0 < min_share <= 1 or max_absorbers < 1:
        raise HsaeError(
            f"absorption: min_share={min_share} must be in (0, 1] and max_absorbers="
            f"{max_absorbers} >= 1"
        )
    col = labels[:, level]
    n_parents = hierarchy.n_classes(level)
    onehot = F.one_hot(col, n_parents)
    probe = fit_ovr_probes(feats, onehot, weight_decay=weight_decay)
    rows = torch.arange(len(col), device=acts.device)
    direction = _without_ancestors(
        F.normalize(probe.direction_do().float(), dim=0), feats, labels, hierarchy, level
    )  # [d, P]
    proj_pk = (decoder.float() @ direction).T.contiguous()  # [P, k]: c_j per unit activation
    cos_pk = proj_pk / decoder.float().norm(dim=1).clamp_min(1e-30)[None]
    x_proj = feats.float() @ direction  # [n, P]
    others = ~onehot.bool()
    baseline = (x_proj * others).sum(dim=0) / others.sum(dim=0).clamp_min(1)
    p_n = x_proj[rows, col] - baseline[col]
    detected = (probe.logits(feats)[rows, col] > 0) & (p_n > 0)
    parents = sibling_difference_latents(acts, labels, hierarchy, level, n_parent_latents)
    # SAE codes are non-negative; anything below 0 is "off". No copy when there is none
    # (at 50,000 images x 24,576 latents the copy is 4.9 GB).
    a = acts if bool(acts.min() >= 0) else acts.clamp_min(0)
    absorbed = torch.zeros(len(col), dtype=torch.bool, device=acts.device)
    missed = torch.zeros_like(absorbed)
    fraction = torch.zeros(len(col), dtype=torch.float64, device=acts.device)
    det_idx = torch.nonzero(detected).squeeze(1)
    # Chunks of detected images, each against its own parent's column: [chunk, k] at a time.
    for start in range(0, len(det_idx), chunk):
        idx = det_idx[start : start + chunk]
        par = col[idx]
        own = parents[par]  # [c, m]
        c_ck = a[idx].float() * proj_pk[par]
        p_c = p_n[idx]
        miss = (a[idx[:, None], own] <= fire_threshold).all(dim=1)
        top_c, top_j = c_ck.max(dim=1)
        full = miss & (cos_pk[par, top_j] >= min_cosine) & (top_c >= min_share * p_c)
        main = c_ck.gather(1, own).sum(dim=1)
        c_ck.scatter_(1, own, 0.0)  # absorbers are latents other than the parent's
        c_ck = torch.where(cos_pk[par] >= fraction_min_cosine, c_ck.clamp_min(0), 0.0)
        absorb = c_ck.topk(min(max_absorbers, c_ck.shape[1]), dim=1).values.sum(dim=1)
        taken = torch.minimum(absorb, p_c - main)
        frac = torch.where(main <= 0, 1.0, taken / (taken + main).clamp_min(1e-30))
        frac = torch.where((main >= p_c) | (absorb < min_share * p_c), 0.0, frac)
        absorbed[idx], missed[idx], fraction[idx] = full, miss & ~full, frac.double()
    n_det = torch.bincount(col[detected], minlength=n_parents)

    def per_parent(values_n: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(n_parents, dtype=torch.float64, device=acts.device)
        sums.index_add_(0, col[detected], values_n[detected].double())
        return torch.where(n_det > 0, sums / n_det.clamp_min(1), math.nan)

    return AbsorptionResult(
        level, parents, per_parent(absorbed), per_parent(missed), per_parent(fraction), n_det
    )


def _absorption_metrics(
    out: Metrics, acts: torch.Tensor, feats_nd: ArrayLike, decoder_kd: ArrayLike,
    labels: torch.Tensor, hierarchy: Hierarchy,
) -> None:  # fmt: skip
    """``interp/absorption_rate``, ``interp/parent_false_negative_rate`` and
    ``interp/absorption_fraction``, per non-leaf level and over all of them."""
    kinds = {
        "absorption_rate": "rate_p",
        "parent_false_negative_rate": "false_negative_p",
        "absorption_fraction": "fraction_p",
    }
    why = "no parent class has images its probe detects"
    per_kind: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    for level in range(hierarchy.n_levels - 1):
        res = absorption(acts, feats_nd, decoder_kd, labels, hierarchy, level=level)
        for kind, attr in kinds.items():
            values = getattr(res, attr)
            out.set_or_undefined(
                f"interp/{kind}@{hierarchy.level_names[level]}", _nanmean(values), why
            )
            per_kind[kind].append(values)
    if hierarchy.n_levels > 1:
        for kind, values in per_kind.items():
            out.set_or_undefined(f"interp/{kind}", _nanmean(torch.cat(values)), why)


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.double())) if (~torch.isnan(x)).any() else math.nan
