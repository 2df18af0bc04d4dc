"""Step 3: how interpretable an SAE's latents are, measured against the label tree.

Inputs are per-image latent activations ``acts_nk`` (``[n_images, n_latents]``, e.g. the max
or mean of each latent over an image's rows), labels ``labels_nl`` and the ``Hierarchy``;
some metrics also take the decoder ``[n_latents, d]``, the SAE's input features, a
reference image embedding, or patch-level activations. A latent *fires* on an image when its
activation is > 0. Its *top images* are the (at most ``n_top``) images with the largest
activation among those it fires on; latents firing on fewer than ``min_fired`` images are
not scored (their per-latent values are NaN; ``interp/scored_latents`` counts the rest).
Everything is batched torch and runs on the tensors' device. ``interp_metrics`` returns the
numbers under their documented names (docs/metrics.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsae.errors import HsaeError
from hsae.hierarchy import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
    as_labels,
    balanced_accuracy,
    binary_probe_logits,
    class_means,
    fit_binary_probes,
    fit_linear_probe,
    fit_ovr_probes,
    require_classes,
    stratified_split,
)
from hsae.metrics.results import Metrics

log = logging.getLogger(__name__)


def _acts_and_labels(
    acts_nk: ArrayLike, labels_nl: ArrayLike, hierarchy: Hierarchy
) -> tuple[torch.Tensor, torch.Tensor]:
    acts = as_features(acts_nk, "latent activations")
    labels = as_labels(labels_nl, hierarchy, acts.shape[0], acts.device)
    for level, name in enumerate(hierarchy.level_names):
        require_classes(labels[:, level], f"interpretability metrics at level {name!r}")
    return acts, labels


# ---------------------------------------------------------------------------------------
# Top-activating images, purity, entropy, level, taxonomy depth
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopImages:
    index_kt: torch.Tensor
    """``[n_latents, n_top]`` image indices, largest activation first (ties: any order);
    where ``valid_kt`` is False the index means nothing."""
    valid_kt: torch.Tensor
    """Whether the latent fired (activation > 0) on that image."""

    @property
    def n_fired_k(self) -> torch.Tensor:
        return self.valid_kt.sum(dim=1)


def top_images(acts_nk: torch.Tensor, n_top: int, chunk: int = 2048) -> TopImages:
    """Each latent's top images. SAE codes are sparse (a TopK SAE with 24,576 latents and
    k = 32 fires ~0.1% of entries), so only the positive entries of each block of latents
    are sorted: a dense ``topk`` down 50,000 images scans every entry of every latent, and
    on a CPU that is minutes. Blocks with many positive entries use the dense ``topk``."""
    if n_top < 2:
        raise HsaeError(f"n_top must be >= 2 (pairs of top images are compared), got {n_top}")
    n_images, n_latents = acts_nk.shape
    n_top = min(n_top, n_images)
    index = torch.zeros(n_latents, n_top, dtype=torch.long, device=acts_nk.device)
    valid = torch.zeros(n_latents, n_top, dtype=torch.bool, device=acts_nk.device)
    for start in range(0, n_latents, chunk):
        block = acts_nk[:, start : start + chunk]
        fired = block > 0
        # Sorting costs ~5 index tensors per positive entry; topk needs none.
        if int(fired.sum()) > block.numel() // 16:
            values, idx = block.topk(n_top, dim=0)  # [T, c]
            index[start : start + block.shape[1]] = idx.T
            valid[start : start + block.shape[1]] = (values > 0).T
            continue
        rows, cols = fired.nonzero(as_tuple=True)
        order = torch.argsort(block[rows, cols], descending=True, stable=True)
        order = order[torch.argsort(cols[order], stable=True)]  # by latent, then value
        rows, cols = rows[order], cols[order]
        n_fired_c = torch.bincount(cols, minlength=block.shape[1])
        first_c = torch.cumsum(n_fired_c, 0) - n_fired_c
        rank = torch.arange(len(cols), device=cols.device) - first_c[cols]
        keep = rank < n_top
        index[start + cols[keep], rank[keep]] = rows[keep]
        valid[start + cols[keep], rank[keep]] = True
    return TopImages(index, valid)


@dataclass(frozen=True)
class LatentPurity:
    purity_kl: torch.Tensor
    """Share of a latent's top images in their most common class, per level."""
    entropy_kl: torch.Tensor
    """Entropy of the class distribution of the top images over log(n_classes): 0 = one
    class, 1 = uniform over every class of the level."""
    adjusted_kl: torch.Tensor
    """Purity corrected for chance, ``(purity - p0) / (1 - p0)`` with ``p0`` the share of the
    level's most common class among all images (what a random set of images scores)."""
    level_k: torch.Tensor
    """The latent's level: the finest level whose adjusted purity is within ``level_tol`` of
    its best (raw purity always grows towards the root, so it cannot pick the level); -1 for
    latents not scored."""
    taxonomy_depth_k: torch.Tensor
    """Mean depth of the LCA over pairs of top images (0 = root, n_levels = same leaf)."""
    scored_k: torch.Tensor
    """Latents with at least ``min_fired`` firing images."""


def label_purity(
    acts_nk: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    n_top: int = 50,
    min_fired: int = 5,
    level_tol: float = 0.05,
    chunk: int = 4096,
) -> LatentPurity:
    """Purity, entropy, chance-adjusted purity, level and taxonomy depth of every latent's top
    images, at every level. All come from one class histogram per latent and level: the
    number of pairs of top images sharing a class at level ``l`` sums to the pairs whose LCA
    is at depth > ``l``, which gives the mean LCA depth without comparing pairs."""
    acts, labels = _acts_and_labels(acts_nk, labels_nl, hierarchy)
    top = top_images(acts, n_top)
    n_levels, n_latents = hierarchy.n_levels, acts.shape[1]
    n_fired = top.n_fired_k.double()
    scored = n_fired >= max(2, min_fired)
    purity = torch.full((n_latents, n_levels), math.nan, dtype=torch.float64, device=acts.device)
    entropy, adjusted = purity.clone(), purity.clone()
    same_pairs = torch.zeros(n_latents, dtype=torch.float64, device=acts.device)
    for level in range(n_levels):
        n_classes = hierarchy.n_classes(level)
        col = labels[:, level]
        p0 = float(torch.bincount(col, minlength=n_classes).max()) / len(col)
        for start in range(0, n_latents, chunk):
            sl = slice(start, min(start + chunk, n_latents))
            lab = col[top.index_kt[sl]]
            counts = torch.zeros(lab.shape[0], n_classes, dtype=torch.float64, device=acts.device)
            counts.scatter_add_(1, lab, top.valid_kt[sl].double())
            n = n_fired[sl].clamp_min(1)[:, None]
            p = counts / n
            purity[sl, level] = p.max(dim=1).values
            plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
            entropy[sl, level] = -plogp.sum(dim=1) / math.log(n_classes)
            same_pairs[sl] += (counts * (counts - 1)).sum(dim=1) / 2
        adjusted[:, level] = (purity[:, level] - p0) / (1 - p0) if p0 < 1 else math.nan
    depth = same_pairs / (n_fired * (n_fired - 1) / 2).clamp_min(1)
    best = adjusted.max(dim=1, keepdim=True).values
    near_best = adjusted >= best - level_tol
    levels = torch.arange(n_levels, device=acts.device).expand(n_latents, -1)
    level_k = torch.where(near_best, levels, torch.full_like(levels, -1)).max(dim=1).values
    nan = torch.tensor(math.nan, dtype=torch.float64, device=acts.device)
    return LatentPurity(
        purity_kl=torch.where(scored[:, None], purity, nan),
        entropy_kl=torch.where(scored[:, None], entropy, nan),
        adjusted_kl=torch.where(scored[:, None], adjusted, nan),
        level_k=torch.where(scored, level_k, torch.full_like(level_k, -1)),
        taxonomy_depth_k=torch.where(scored, depth, nan),
        scored_k=scored,
    )


def group_taxonomy_depth(
    taxonomy_depth_k: torch.Tensor, groups: Sequence[tuple[int, int]]
) -> list[float]:
    """Mean taxonomy depth of the scored latents in each ``[start, stop)`` index range (e.g.
    the nested prefixes or the increments of a Matryoshka SAE); NaN for a group with none."""
    out = []
    for start, stop in groups:
        if not 0 <= start < stop <= len(taxonomy_depth_k):
            raise HsaeError(
                f"latent group [{start}, {stop}) is not inside [0, {len(taxonomy_depth_k)}); "
                "pass (start, stop) ranges of latent indices"
            )
        out.append(float(torch.nanmean(taxonomy_depth_k[start:stop])))
    return out


# ---------------------------------------------------------------------------------------
# MonoSemanticity score (Pach et al. 2025), linear-time form
# ---------------------------------------------------------------------------------------


def monosemanticity_score(
    acts_nk: ArrayLike, ref_emb_ne: ArrayLike, chunk: int = 1024
) -> torch.Tensor:
    """Per-latent MS: the activation-weighted mean cosine similarity of pairs of distinct
    images in a fixed reference embedding,

        MS_k = sum_{n != m} a_n a_m s_nm / sum_{n != m} a_n a_m,

    with ``a`` the latent's activations min-max normalised to [0, 1] over the images and
    ``s_nm`` the cosine similarity of the images' reference embeddings. With unit embeddings
    ``e_n``, ``sum_{n != m} a_n a_m s_nm = ||sum_n a_n e_n||^2 - sum_n a_n^2`` and
    ``sum_{n != m} a_n a_m = (sum_n a_n)^2 - sum_n a_n^2``, so it costs ``O(n)`` per latent,
    not ``O(n^2)``. NaN for a latent that is constant or fires on a single image."""
    acts = as_features(acts_nk, "latent activations")
    ref = as_features(ref_emb_ne, "reference embeddings").to(acts.device)
    if ref.shape[0] != acts.shape[0]:
        raise HsaeError(
            f"reference embeddings have {ref.shape[0]} rows, activations {acts.shape[0]}; pass "
            "one reference embedding per image, in the same order"
        )
    unit = F.normalize(ref.double(), dim=1)
    out = torch.empty(acts.shape[1], dtype=torch.float64, device=acts.device)
    for start in range(0, acts.shape[1], chunk):
        raw = acts[:, start : start + chunk]
        lo, hi = (v.double() for v in raw.aminmax(dim=0))
        span = (hi - lo).clamp_min(1e-30)
        sparse = bool((lo == 0).all()) and int(raw.count_nonzero()) <= raw.numel() // 16
        if sparse:  # see _sparse_ms_sums
            sq, total, proj = _sparse_ms_sums(raw, span, unit)
        else:
            a = (raw.double() - lo) / span
            sq, total, proj = a.pow(2).sum(dim=0), a.sum(dim=0), a.T @ unit
        num = proj.pow(2).sum(dim=1) - sq
        den = total.pow(2) - sq
        ok = (hi > lo) & (den > 1e-12)
        out[start : start + chunk] = torch.where(ok, num / den.clamp_min(1e-30), math.nan)
    return out


def _sparse_ms_sums(
    raw_nc: torch.Tensor, span_c: torch.Tensor, unit_ne: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sum_n a_n^2``, ``sum_n a_n`` and ``sum_n a_n e_n`` of a block of latents whose
    minimum is 0 (so min-max normalising keeps their zeros), from the non-zero entries only:
    a TopK SAE with 24,576 latents is non-zero on ~0.1% of them, and the dense float64
    products over every image are most of MS's time on a CPU."""
    rows, cols = raw_nc.nonzero(as_tuple=True)
    a = raw_nc[rows, cols].double() / span_c[cols]
    n_c = raw_nc.shape[1]
    sq = torch.zeros(n_c, dtype=torch.float64, device=a.device).index_add_(0, cols, a * a)
    total = torch.zeros(n_c, dtype=torch.float64, device=a.device).index_add_(0, cols, a)
    a_cn = torch.sparse_coo_tensor(
        torch.stack([cols, rows]), a, (n_c, raw_nc.shape[0]), check_invariants=False
    )
    return sq, total, torch.sparse.mm(a_cn, unit_ne)


# ---------------------------------------------------------------------------------------
# Uniqueness: overlap of top-image sets
# ---------------------------------------------------------------------------------------


def top_set_overlap(
    acts_nk: ArrayLike,
    n_top: int = 50,
    min_fired: int = 5,
    max_latents: int = 4096,
    seed: int = 0,
    chunk: int = 512,
) -> float:
    """Mean Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of the top-image sets over all pairs of
    distinct scored latents (0 = every latent has its own images; 1 = all the same). Over
    more than ``max_latents`` scored latents it is estimated on a seeded random subset."""
    acts = as_features(acts_nk, "latent activations")
    top = top_images(acts, n_top)
    live = torch.nonzero(top.n_fired_k >= max(2, min_fired)).squeeze(1)
    if len(live) < 2:
        raise HsaeError(
            f"top-set overlap needs >= 2 latents firing on >= {min_fired} images, found "
            f"{len(live)}; use more images or lower min_fired"
        )
    if len(live) > max_latents:
        keep = np.sort(np.random.default_rng(seed).choice(len(live), max_latents, replace=False))
        live = live[torch.as_tensor(keep, device=live.device)]
    index, valid = top.index_kt[live], top.valid_kt[live]
    n_k = len(live)
    rows = torch.arange(n_k, device=acts.device)[:, None].expand_as(index)[valid]
    member = torch.sparse_coo_tensor(
        torch.stack([rows, index[valid]]),
        torch.ones(len(rows), device=acts.device),
        (n_k, acts.shape[0]),
        check_invariants=False,  # built from valid indices just above
    ).coalesce()
    sizes = valid.sum(dim=1).double()
    total, n_pairs = 0.0, n_k * (n_k - 1) / 2
    for start in range(0, n_k, chunk):
        stop = min(start + chunk, n_k)
        dense_cn = torch.zeros(stop - start, acts.shape[0], device=acts.device)
        ok = valid[start:stop]
        local = torch.arange(stop - start, device=acts.device)[:, None].expand_as(ok)
        dense_cn[local[ok], index[start:stop][ok]] = 1.0  # other indices of index mean nothing
        inter = torch.sparse.mm(member, dense_cn.T).double()  # [n_k, c] intersection sizes
        union = sizes[:, None] + sizes[None, start:stop] - inter
        jac = inter / union
        # Pairs (i, j) with i < j only: row index below the column's latent index.
        col_ids = torch.arange(start, stop, device=acts.device)[None, :]
        total += float(jac[_upper_mask(n_k, col_ids)].sum())
    return total / n_pairs


def _upper_mask(n_rows: int, col_ids_1c: torch.Tensor) -> torch.Tensor:
    """Mask ``[n_rows, c]``: row index < the column's id (the strict upper triangle)."""
    return torch.arange(n_rows, device=col_ids_1c.device)[:, None] < col_ids_1c


# ---------------------------------------------------------------------------------------
# Localization: Moran's I over the patch grid
# ---------------------------------------------------------------------------------------


def morans_i(grid_bhw: torch.Tensor) -> torch.Tensor:
    """Moran's I of each ``[h, w]`` map with rook adjacency (4 neighbours, binary weights):

        I = (N / S0) * sum_ij w_ij z_i z_j / sum_i z_i^2,  z = x - mean(x),

    ``S0 = sum_ij w_ij``. 1 = neighbours alike (smooth blobs), ~0 = no spatial structure,
    -1 = neighbours opposite (a checkerboard). NaN for a constant map."""
    if grid_bhw.ndim != 3 or grid_bhw.shape[1] * grid_bhw.shape[2] < 2:
        raise HsaeError(
            f"Moran's I needs [b, h, w] maps with >= 2 cells, got {tuple(grid_bhw.shape)}"
        )
    x = grid_bhw.double()
    z = x - x.mean(dim=(1, 2), keepdim=True)
    h, w = x.shape[1:]
    # Each neighbouring pair counts twice in sum_ij (w_ij = w_ji = 1).
    cross = 2 * (
        (z[:, :, 1:] * z[:, :, :-1]).sum(dim=(1, 2)) + (z[:, 1:] * z[:, :-1]).sum(dim=(1, 2))
    )
    s0 = 2 * (h * (w - 1) + w * (h - 1))
    var = z.pow(2).sum(dim=(1, 2))
    constant = var <= 1e-12 * x.abs().amax(dim=(1, 2)).pow(2).clamp_min(1e-300)
    return torch.where(constant, math.nan, (h * w / s0) * cross / var.clamp_min(1e-300))


class MoranAccumulator:
    """Mean Moran's I of each latent's patch map over the images where it fires, streamed
    over batches: ``update(acts_npk)`` with patch rows in row-major grid order (``p = h*w``,
    CLS/register tokens removed), then ``compute()`` -> ``[n_latents]`` (NaN for latents
    that never fired on a map with spatial variation)."""

    def __init__(
        self, n_latents: int, grid_hw: tuple[int, int], device: str | torch.device = "cpu"
    ):
        self.grid_hw = tuple(grid_hw)
        self.sum_k = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self.count_k = torch.zeros(n_latents, dtype=torch.long, device=device)

    def update(self, acts_npk: torch.Tensor) -> None:
        h, w = self.grid_hw
        if acts_npk.ndim != 3 or acts_npk.shape[1] != h * w or acts_npk.shape[2] != len(self.sum_k):
            raise HsaeError(
                f"patch activations must be [n_images, {h * w}, {len(self.sum_k)}] "
                f"(grid {h}x{w}, patch tokens only), got {tuple(acts_npk.shape)}"
            )
        acts = acts_npk.to(self.sum_k.device)
        # Only the maps of latents that fire on the image: a few hundred of 24,576 for a
        # TopK SAE, and scoring every map costs ~30x more for the same result.
        image, latent = (acts.amax(dim=1) > 0).nonzero(as_tuple=True)
        moran = morans_i(acts.permute(0, 2, 1)[image, latent].view(-1, h, w))
        use = ~torch.isnan(moran)
        self.sum_k.index_add_(0, latent[use], moran[use])
        self.count_k += torch.bincount(latent[use], minlength=len(self.count_k))

    def compute(self) -> torch.Tensor:
        return torch.where(self.count_k > 0, self.sum_k / self.count_k.clamp_min(1), math.nan)


# ---------------------------------------------------------------------------------------
# Sparse probing
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Absorption
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Automatic names
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentNames:
    names: list[str]
    """The vocabulary entry nearest to each latent's decoder direction."""
    index_k: torch.Tensor
    """Its index in the vocabulary."""
    score_k: torch.Tensor
    """Cosine similarity with it (the name's confidence)."""


def name_latents(
    decoder_kd: ArrayLike,
    text_emb_ve: ArrayLike,
    vocabulary: Sequence[str],
    projection_de: ArrayLike | None = None,
) -> LatentNames:
    """Name each latent by the vocabulary entry (class names or a word list) whose text
    embedding has the largest cosine similarity with the latent's decoder direction, mapped
    into the text space by ``projection_de`` (e.g. the backbone's remaining layers
    linearised, or CLIP's visual projection for a last-layer SAE; identity when omitted)."""
    decoder = as_features(decoder_kd, "decoder")
    text = as_features(text_emb_ve, "text embeddings").to(decoder.device)
    if len(vocabulary) != text.shape[0]:
        raise HsaeError(
            f"{len(vocabulary)} vocabulary entries but {text.shape[0]} text embeddings; pass "
            "one embedding per entry, in order"
        )
    mapped = decoder
    if projection_de is not None:
        proj = as_features(projection_de, "projection").to(decoder.device)
        if proj.shape[0] != decoder.shape[1]:
            raise HsaeError(
                f"projection must be [d={decoder.shape[1]}, e] (feature space -> text space), "
                f"got {tuple(proj.shape)}"
            )
        mapped = decoder @ proj
    if mapped.shape[1] != text.shape[1]:
        raise HsaeError(
            f"decoder directions have width {mapped.shape[1]} but text embeddings {text.shape[1]}; "
            "pass projection_de to map feature space into the text space"
        )
    cos = F.normalize(mapped, dim=1) @ F.normalize(text, dim=1).T
    score, index = cos.max(dim=1)
    return LatentNames([vocabulary[i] for i in index.tolist()], index, score)


@dataclass(frozen=True)
class TopClass:
    class_k: torch.Tensor
    """The most common class among each latent's top images (those it fires on)."""
    purity_k: torch.Tensor
    """That class's share of them (0 for a latent that never fires)."""
    n_fired_k: torch.Tensor
    """How many of the top images the latent fires on (at most ``n_top``)."""


def top_class(
    acts_nk: torch.Tensor, labels_n: torch.Tensor, n_classes: int, n_top: int = 20,
    chunk: int = 4096,
) -> TopClass:  # fmt: skip
    """Each latent's class: the majority label of the (at most ``n_top``) images it fires on
    most. Ties go to the lower class index."""
    top = acts_nk.topk(min(n_top, acts_nk.shape[0]), dim=0)
    fired_tk = top.values > 0
    labels_tk = labels_n.to(acts_nk.device)[top.indices]
    n_latents = acts_nk.shape[1]
    class_k = torch.empty(n_latents, dtype=torch.long, device=acts_nk.device)
    best_k = torch.empty(n_latents, dtype=torch.long, device=acts_nk.device)
    for start in range(0, n_latents, chunk):  # [n_classes, chunk] counts, not [n_classes, k]
        sl = slice(start, min(start + chunk, n_latents))
        counts = torch.zeros(n_classes, sl.stop - start, dtype=torch.long, device=acts_nk.device)
        counts.scatter_add_(0, labels_tk[:, sl], fired_tk[:, sl].long())
        best_k[sl], class_k[sl] = counts.max(dim=0).values, counts.argmax(dim=0)
    n_fired = fired_tk.sum(dim=0)
    return TopClass(class_k, best_k / n_fired.clamp_min(1), n_fired)


@dataclass(frozen=True)
class JointMap:
    map_de: torch.Tensor
    """``[d, e]`` ridge map from a layer's (centred) features to the joint image embedding."""
    r2: float
    """Held-out R^2 of the map (variance-weighted over the embedding's dimensions)."""
    ridge: float
    """The penalty chosen, as a fraction of the mean eigenvalue of the features' scatter."""


def fit_joint_map(
    feats_nd: ArrayLike,
    emb_ne: ArrayLike,
    test_fraction: float = 0.2,
    seed: int = 0,
    ridges: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0),
) -> JointMap:
    """Least squares with a ridge penalty from a hooked layer's features to the backbone's
    final image embedding, both centred: a latent that adds ``a * d_j`` to the layer moves
    the embedding by ``a * d_j @ map_de`` as far as the backbone is linear there. The
    penalty ``lambda = r * trace(X^T X) / d`` takes the ``r`` in ``ridges`` with the lowest
    generalised cross-validation error on the fitting rows; ``r2`` is scored on the
    ``test_fraction`` held out (seeded), so it says how far the names can be trusted."""
    if not ridges or min(ridges) <= 0:
        raise HsaeError(f"ridges must be positive fractions, got {list(ridges)}")
    x = as_features(feats_nd, "layer features").double().cpu()
    y = as_features(emb_ne, "image embeddings").double().cpu()
    if x.shape[0] != y.shape[0]:
        raise HsaeError(
            f"{x.shape[0]} layer features but {y.shape[0]} image embeddings; pass both for the "
            "same images, in the same order"
        )
    n_test = round(x.shape[0] * test_fraction)
    if n_test < 2 or x.shape[0] - n_test < 2:
        raise HsaeError(
            f"the joint-space map needs >= 2 fitting and >= 2 held-out images, got {x.shape[0]} "
            f"images with test_fraction={test_fraction}; evaluate on a larger split"
        )
    order = torch.as_tensor(np.random.default_rng(seed).permutation(x.shape[0]))
    test, fit = order[:n_test], order[n_test:]
    x_mean, y_mean = x[fit].mean(dim=0), y[fit].mean(dim=0)
    xc, yc = x[fit] - x_mean, y[fit] - y_mean
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    uy = u.T @ yc  # [r, e]
    uy_sq, s_sq, n_fit = uy.pow(2).sum(dim=1), s.pow(2), xc.shape[0]
    scale = float(s_sq.sum()) / x.shape[1]
    gcv = []
    for r in ridges:
        shrink = s_sq / (s_sq + r * scale)
        rss = float(yc.pow(2).sum() - ((2 * shrink - shrink.pow(2)) * uy_sq).sum())
        gcv.append(rss / max(1.0 - float(shrink.sum()) / n_fit, 1e-12) ** 2)
    ridge = ridges[int(np.argmin(gcv))]
    map_de = vh.T @ ((s / (s_sq + ridge * scale))[:, None] * uy)
    pred = (x[test] - x_mean) @ map_de + y_mean
    sst = float((y[test] - y[test].mean(dim=0)).pow(2).sum())
    r2 = 1.0 - float((y[test] - pred).pow(2).sum()) / sst if sst > 0 else math.nan
    return JointMap(map_de.float(), r2, ridge)


def centred_text(text_ve: ArrayLike) -> torch.Tensor:
    """Unit text embeddings minus their mean over the vocabulary. A latent's mapped
    direction is a change of the image embedding; CLIP's text embeddings share a large
    common part that says nothing about which entry fits, and would squash every cosine."""
    unit = F.normalize(as_features(text_ve, "text embeddings"), dim=1)
    return unit - unit.mean(dim=0) if unit.shape[0] > 1 else unit


@dataclass(frozen=True)
class NameReport:
    metrics: dict[str, float]
    """``interp/name_score``, ``interp/name_agreement@<level>``, ``interp/majority_latents@<level>``."""
    columns: list[str]
    rows: list[list]
    """One row per latent that fires on at least one image."""


def name_report(
    decoder_kd: ArrayLike,
    map_de: ArrayLike,
    acts_nk: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    class_text: Sequence[ArrayLike],
    vocabulary: Sequence[str] | None = None,
    vocab_text_ve: ArrayLike | None = None,
    n_top: int = 50,
    min_fired: int = 5,
    majority: float = 0.5,
) -> NameReport:
    """Names each latent (``name_latents`` with ``projection_de=map_de``, text embeddings
    centred) at every level among that level's class names (``class_text[l]``, one
    embedding per class of level ``l``), and by the nearest entry of ``vocabulary`` (default:
    every level's class names together). A latent whose top images have a clear majority
    class at a level (at least ``min_fired`` images, share > ``majority``) *agrees* there
    when its name at that level is that class: ``interp/name_agreement@<level>`` (chance is
    about 1 / n_classes). ``interp/name_score``: mean cosine of the vocabulary name over the
    latents firing on at least ``min_fired`` images."""
    acts, labels = _acts_and_labels(acts_nk, labels_nl, hierarchy)
    decoder = as_features(decoder_kd, "decoder").to(acts.device)
    if decoder.shape[0] != acts.shape[1]:
        raise HsaeError(
            f"decoder has {decoder.shape[0]} rows but there are {acts.shape[1]} latents; pass "
            "one decoder row per latent"
        )
    if len(class_text) != hierarchy.n_levels:
        raise HsaeError(
            f"class_text has {len(class_text)} entries, the hierarchy {hierarchy.n_levels} "
            "levels; pass one [n_classes, e] text embedding per level"
        )
    if (vocabulary is None) != (vocab_text_ve is None):
        raise HsaeError("pass vocabulary and vocab_text_ve together (or neither)")
    texts = [as_features(t, "class text embeddings") for t in class_text]
    if vocabulary is None:  # every class name once, coarse levels first
        first: dict[str, torch.Tensor] = {}
        for level, text in enumerate(texts):
            for c, name in enumerate(hierarchy.class_names[level]):
                first.setdefault(name, text[c])
        vocabulary, vocab_text_ve = list(first), torch.stack(list(first.values()))
    assert vocab_text_ve is not None  # checked above: given with vocabulary, or just built
    named = name_latents(decoder, centred_text(vocab_text_ve), vocabulary, map_de)
    n_images_k = (acts > 0).sum(dim=0)
    scored = n_images_k >= min_fired
    out = {"interp/name_score": _nanmean(torch.where(scored, named.score_k, math.nan))}
    columns = ["latent", "n_images", "name", "name_score"]
    per_level = []
    for level, level_name in enumerate(hierarchy.level_names):
        names = hierarchy.class_names[level]
        at_level = name_latents(decoder, centred_text(texts[level]), names, map_de)
        top = top_class(acts, labels[:, level], hierarchy.n_classes(level), n_top)
        clear = (top.n_fired_k >= min_fired) & (top.purity_k > majority)
        agree = (at_level.index_k.to(acts.device) == top.class_k) & clear
        n_clear = int(clear.sum())
        out[f"interp/name_agreement@{level_name}"] = (
            float(agree.sum()) / n_clear if n_clear else math.nan
        )
        out[f"interp/majority_latents@{level_name}"] = float(n_clear)
        columns += [f"name@{level_name}", f"top_class@{level_name}", f"top_purity@{level_name}"]
        classes = [names[c] for c in top.class_k.tolist()]
        per_level.append((at_level.names, classes, top.purity_k.tolist()))
    n_images, scores = n_images_k.tolist(), named.score_k.tolist()
    rows = []
    for j in torch.nonzero(n_images_k > 0).squeeze(1).tolist():
        row = [j, n_images[j], named.names[j], round(scores[j], 4)]
        for level_names, classes, purity in per_level:
            row += [level_names[j], classes[j], round(purity[j], 4)]
        rows.append(row)
    return NameReport(out, columns, rows)


# ---------------------------------------------------------------------------------------
# Fidelity
# ---------------------------------------------------------------------------------------


def fidelity_metrics(
    feats_nd: ArrayLike,
    recon_nd: ArrayLike,
    ablated_nd: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    test_fraction: float = 0.3,
    seed: int = 0,
    weight_decay: float = 1e-4,
) -> Metrics:
    """Probe accuracy with the SAE spliced in: a linear probe per level trained on the
    original features (training split), scored on the held-out split of the original,
    reconstructed and ablated features (e.g. zeros, or the backbone's output with the layer
    zeroed). ``fidelity/recovered@<level>`` = (recon - ablated) / (original - ablated), the
    vision analogue of "loss recovered" (1 = the SAE loses nothing; NaN when ablation does
    not hurt the probe)."""
    feats = as_features(feats_nd)
    recon = as_features(recon_nd, "reconstructed features").to(feats.device)
    ablated = as_features(ablated_nd, "ablated features").to(feats.device)
    if recon.shape != feats.shape or ablated.shape != feats.shape:
        raise HsaeError(
            f"original {tuple(feats.shape)}, reconstructed {tuple(recon.shape)} and ablated "
            f"{tuple(ablated.shape)} features must have the same shape (same images, order)"
        )
    labels = as_labels(labels_nl, hierarchy, feats.shape[0], feats.device)
    train_idx, test_idx = stratified_split(labels[:, -1], test_fraction, seed)
    tr = torch.as_tensor(train_idx, device=feats.device)
    te = torch.as_tensor(test_idx, device=feats.device)
    out = Metrics()
    for level, name in enumerate(hierarchy.level_names):
        require_classes(labels[:, level], f"fidelity probe at level {name!r}")
        probe = fit_linear_probe(
            feats[tr], labels[tr, level], hierarchy.n_classes(level), weight_decay
        )
        y = labels[te, level]
        acc = {
            kind: float((probe.logits(x[te]).argmax(dim=1) == y).float().mean())
            for kind, x in (("original", feats), ("reconstructed", recon), ("ablated", ablated))
        }
        for kind, value in acc.items():
            out[f"fidelity/probe_acc@{name}/{kind}"] = value
        gap = acc["original"] - acc["ablated"]
        if abs(gap) > 1e-9:
            out[f"fidelity/recovered@{name}"] = (acc["reconstructed"] - acc["ablated"]) / gap
        else:
            out.undefined(
                f"fidelity/recovered@{name}",
                "ablation does not change the probe's accuracy: there is no gap to recover",
            )
    return out


# ---------------------------------------------------------------------------------------
# Everything under its documented name
# ---------------------------------------------------------------------------------------


def _nanmean(x: torch.Tensor) -> float:
    return float(torch.nanmean(x.double())) if (~torch.isnan(x)).any() else math.nan


def interp_metrics(
    acts_nk: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    *,
    decoder_kd: ArrayLike | None = None,
    feats_nd: ArrayLike | None = None,
    ref_emb_ne: ArrayLike | None = None,
    moran_i_k: torch.Tensor | None = None,
    groups: Sequence[tuple[int, int]] | None = None,
    n_top: int = 50,
    min_fired: int = 5,
    ks: Sequence[int] = (1, 2, 5),
    seed: int = 0,
) -> Metrics:
    """Every step-3 metric the inputs allow, as a flat dict of documented names. MS needs
    ``ref_emb_ne``; absorption needs ``decoder_kd`` and ``feats_nd`` (the SAE's inputs, one
    row per image, pooled like ``acts_nk``); ``interp/moran_i`` needs ``moran_i_k`` from a
    ``MoranAccumulator``. What is skipped for want of an input is logged. Every per-latent
    mean is over one set, the *scored* latents (firing on >= ``min_fired`` images); a
    metric without a value on this data is NaN, with the reason in ``.skipped``."""
    acts, labels = _acts_and_labels(acts_nk, labels_nl, hierarchy)
    names = hierarchy.level_names
    purity = label_purity(acts, labels, hierarchy, n_top=n_top, min_fired=min_fired)
    scored = purity.scored_k
    n_scored = int(scored.sum())
    out = Metrics({"interp/scored_latents": float(n_scored)})
    if n_scored == 0:
        raise HsaeError(
            f"no latent fires on >= {min_fired} of the {acts.shape[0]} images; the SAE is dead "
            "on this data, or pass more images / lower min_fired"
        )
    for level, name in enumerate(names):
        out[f"interp/purity@{name}"] = _nanmean(purity.purity_kl[:, level])
        out[f"interp/entropy@{name}"] = _nanmean(purity.entropy_kl[:, level])
        out[f"interp/level_fraction@{name}"] = float(
            (purity.level_k == level).sum() / max(n_scored, 1)
        )
    out["interp/taxonomy_depth"] = _nanmean(purity.taxonomy_depth_k)
    for g, value in enumerate(group_taxonomy_depth(purity.taxonomy_depth_k, groups or ())):
        out.set_or_undefined(
            f"interp/taxonomy_depth/group{g}", value,
            f"no latent of group {g} fires on >= {min_fired} images",
        )  # fmt: skip
    if ref_emb_ne is not None:
        ms_k = monosemanticity_score(acts, ref_emb_ne)
        out.set_or_undefined(
            "interp/ms", _nanmean(ms_k[scored.to(ms_k.device)]),
            "every scored latent has constant activations (MS needs distinct ones)",
        )  # fmt: skip
    else:
        log.info("interp/ms skipped: no reference embedding given")
    if n_scored >= 2:
        overlap = top_set_overlap(acts, n_top=n_top, min_fired=min_fired, seed=seed)
        out["interp/top_overlap"] = overlap
        out["interp/uniqueness"] = 1.0 - overlap
    else:
        why = f"needs 2 latents firing on >= {min_fired} images (pairs of top-image sets); 1 does"
        out.undefined("interp/top_overlap", why)
        out.undefined("interp/uniqueness", why)
    if moran_i_k is not None:
        moran = torch.as_tensor(moran_i_k)
        if moran.shape != (acts.shape[1],):
            raise HsaeError(
                f"moran_i_k must hold one value per latent ({acts.shape[1]}), got shape "
                f"{tuple(moran.shape)}"
            )
        out.set_or_undefined(
            "interp/moran_i", _nanmean(moran[scored.to(moran.device)]),
            "no scored latent fires on a patch map with spatial variation",
        )  # fmt: skip
    probes = sparse_probing(acts, labels, hierarchy, ks=ks, seed=seed)
    for (level, k), acc in probes.items():
        out.set_or_undefined(
            f"interp/sparse_probe@k{k}/{names[level]}", _nanmean(acc),
            "no class of this level has images on both sides of the probes' split",
        )  # fmt: skip
    if decoder_kd is not None and feats_nd is not None:
        _absorption_metrics(out, acts, feats_nd, decoder_kd, labels, hierarchy)
    else:
        log.info("interp/absorption skipped: needs decoder_kd and feats_nd")
    return out


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
