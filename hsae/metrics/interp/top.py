"""Top-activating images, label purity, entropy, level and taxonomy depth, a latent's class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
    as_labels,
    require_classes,
)


def _acts_and_labels(
    acts_nk: ArrayLike, labels_nl: ArrayLike, hierarchy: Hierarchy
) -> tuple[torch.Tensor, torch.Tensor]:
    acts = as_features(acts_nk, "latent activations")
    labels = as_labels(labels_nl, hierarchy, acts.shape[0], acts.device)
    for level, name in enumerate(hierarchy.level_names):
        require_classes(labels[:, level], f"interpretability metrics at level {name!r}")
    return acts, labels


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
