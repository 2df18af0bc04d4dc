"""Per-latent numbers the browser shows, streamed over blocks of latents.

Input: per-image activations ``acts`` (``[n_images, n_latents]``: a dense tensor, as
``evaluate.py``'s image pass holds it, or a scipy sparse matrix), one label row per image
and the label tree. Only one block of ``block`` latents is ever dense at a time, so the
memory beyond the input is ``n_images x block`` floats plus a few ``[n_latents, n_show]``
tables (24,576 latents x 50,000 images: ~200 MB at the default block), never the
``[images x latents x patches]`` buffer that ran saev out of memory.

Purity, chance-adjusted purity, purest level and taxonomy depth come from
``hsae.metrics.interp.label_purity`` on the same top images (``n_top``), so the page agrees
with ``interp/purity@<level>`` in ``eval.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.interp import top_images

ActsLike: TypeAlias = torch.Tensor | sp.spmatrix | sp.sparray


def n_latents_of(acts: ActsLike) -> int:
    return int(acts.shape[1])


def column_block(acts: ActsLike, start: int, stop: int) -> torch.Tensor:
    """Latents ``[start, stop)`` of every image as a dense float32 ``[n_images, c]``."""
    if isinstance(acts, torch.Tensor):
        return acts[:, start:stop].float()
    block = sp.csc_matrix(acts[:, start:stop]).toarray()
    return torch.from_numpy(block.astype(np.float32, copy=False))


@dataclass
class LatentTable:
    """Everything per latent (``_k``), per latent and level (``_kl``), per shown image (``_ks``)."""

    n_images: int
    n_fired_k: np.ndarray
    """Images the latent fires on (its per-image activation > 0)."""
    density_k: np.ndarray
    mean_act_k: np.ndarray
    """Mean per-image activation over the images it fires on."""
    max_act_k: np.ndarray
    purity_kl: np.ndarray
    adjusted_kl: np.ndarray
    level_k: np.ndarray
    """Purest level (``label_purity``'s ``level_k``); -1: fires on too few images to score."""
    depth_k: np.ndarray
    top_class_kl: np.ndarray
    """Most common class among the top ``n_top`` images; -1 for a latent that never fires."""
    dist_class_kld: np.ndarray
    """The ``n_dist`` most common classes among the top images, most common first (-1: none)."""
    dist_count_kld: np.ndarray
    n_top_k: np.ndarray
    """How many top images the distribution counts (at most ``n_top``)."""
    show_row_ks: np.ndarray
    """Image rows (of ``acts``) of the ``n_show`` top images, largest first; -1: none."""
    show_value_ks: np.ndarray
    image_nnz_n: np.ndarray
    """Latents firing on each image (sizes the co-activation computation)."""
    contain_parent_k: np.ndarray | None = None
    contain_score_k: np.ndarray | None = None
    contain_images: int = 0


@dataclass
class _Block:
    """One block of ``c`` latents: firing counts, sums, maxima and top images."""

    n_fired_c: np.ndarray
    total_c: np.ndarray
    image_nnz_n: np.ndarray
    index_ct: torch.Tensor
    valid_ct: torch.Tensor
    value_ct: torch.Tensor


def _dense_block(a: torch.Tensor, n_top: int) -> _Block:
    fired = a > 0
    top = top_images(a, n_top)  # sparse-aware: sorts the positive entries only
    cols = torch.arange(a.shape[1], device=a.device)[:, None].expand_as(top.index_kt)
    return _Block(
        n_fired_c=torch.count_nonzero(fired, dim=0).cpu().numpy(),  # a bool .sum() copies to int64
        total_c=torch.where(fired, a, 0).sum(dim=0, dtype=torch.float64).cpu().numpy(),
        image_nnz_n=torch.count_nonzero(fired, dim=1).cpu().numpy(),
        index_ct=top.index_kt.cpu(),
        valid_ct=top.valid_kt.cpu(),
        value_ct=torch.where(top.valid_kt, a[top.index_kt, cols], 0).cpu(),
    )


def _sparse_block(block: sp.csc_matrix, n_images: int, n_top: int) -> _Block:
    """The same from a CSC block's stored entries alone: no dense ``[images x c]``."""
    block = sp.csc_matrix(block)
    block.sum_duplicates()  # also sorts each column's rows: ties go to the lower row, as top_images
    n_cols = block.shape[1]
    cols = np.repeat(np.arange(n_cols), np.diff(block.indptr))
    positive = block.data > 0
    rows, cols, vals = block.indices[positive], cols[positive], block.data[positive]
    order = np.lexsort((-vals, cols))  # by latent, then largest first (stable)
    rows, cols, vals = rows[order], cols[order], vals[order]
    n_fired = np.bincount(cols, minlength=n_cols)
    rank = np.arange(len(cols)) - (np.cumsum(n_fired) - n_fired)[cols]
    keep = rank < n_top
    n_top = min(n_top, n_images)
    index = torch.zeros(n_cols, n_top, dtype=torch.long)
    valid = torch.zeros(n_cols, n_top, dtype=torch.bool)
    value = torch.zeros(n_cols, n_top)
    at = (torch.as_tensor(cols[keep]), torch.as_tensor(rank[keep]))
    index[at] = torch.as_tensor(rows[keep], dtype=torch.long)
    valid[at] = True
    value[at] = torch.as_tensor(vals[keep], dtype=torch.float32)
    return _Block(
        n_fired_c=n_fired,
        total_c=np.bincount(cols, weights=vals, minlength=n_cols),
        image_nnz_n=np.bincount(rows, minlength=n_images),
        index_ct=index,
        valid_ct=valid,
        value_ct=value,
    )


def latent_table(
    acts: ActsLike,
    labels_nl: np.ndarray,
    hierarchy: Hierarchy,
    n_top: int = 50,
    n_show: int = 12,
    n_dist: int = 5,
    min_fired: int = 5,
    level_tol: float = 0.05,
    block: int = 1024,
) -> LatentTable:
    """Purity, chance-adjusted purity, purest level and taxonomy depth follow
    ``hsae.metrics.interp.label_purity`` (same ``n_top``, ``min_fired``, ``level_tol``; a
    test holds them equal), computed from the same class histograms as the distributions."""
    n_images, n_latents = int(acts.shape[0]), n_latents_of(acts)
    if n_images < 2 or n_latents < 1:
        raise HsaeError(f"the browser needs >= 2 images and >= 1 latent, got {tuple(acts.shape)}")
    if len(labels_nl) != n_images:
        raise HsaeError(
            f"{len(labels_nl)} label rows for {n_images} images; pass one label row per image"
        )
    n_levels = hierarchy.n_levels
    n_show = min(n_show, n_top, n_images)
    labels = torch.as_tensor(np.asarray(labels_nl, dtype=np.int64))
    # What a random set of images scores: the share of each level's most common class.
    p0_l = [float(np.bincount(labels_nl[:, lv]).max()) / n_images for lv in range(n_levels)]
    out = LatentTable(
        n_images=n_images,
        n_fired_k=np.zeros(n_latents, np.int64),
        density_k=np.zeros(n_latents),
        mean_act_k=np.full(n_latents, math.nan),
        max_act_k=np.zeros(n_latents),
        purity_kl=np.full((n_latents, n_levels), math.nan),
        adjusted_kl=np.full((n_latents, n_levels), math.nan),
        level_k=np.full(n_latents, -1, np.int64),
        depth_k=np.full(n_latents, math.nan),
        top_class_kl=np.full((n_latents, n_levels), -1, np.int64),
        dist_class_kld=np.full((n_latents, n_levels, n_dist), -1, np.int32),
        dist_count_kld=np.zeros((n_latents, n_levels, n_dist), np.int32),
        n_top_k=np.zeros(n_latents, np.int64),
        show_row_ks=np.full((n_latents, n_show), -1, np.int64),
        show_value_ks=np.zeros((n_latents, n_show), np.float32),
        image_nnz_n=np.zeros(n_images, np.int64),
    )
    dense = isinstance(acts, torch.Tensor)
    for start in range(0, n_latents, block):
        stop = min(start + block, n_latents)
        b = (
            _dense_block(acts[:, start:stop].float(), n_top)
            if dense
            else _sparse_block(acts[:, start:stop], n_images, n_top)
        )
        sl = slice(start, stop)
        out.image_nnz_n += b.image_nnz_n
        out.n_fired_k[sl] = b.n_fired_c
        with np.errstate(invalid="ignore", divide="ignore"):
            out.mean_act_k[sl] = np.where(b.n_fired_c > 0, b.total_c / b.n_fired_c, math.nan)
        out.max_act_k[sl] = b.value_ct[:, 0].clamp_min(0).numpy()
        valid = b.valid_ct
        n_top_c = valid.sum(dim=1).double()
        out.n_top_k[sl] = n_top_c.long().numpy()
        scored = n_top_c >= max(2, min_fired)
        same_pairs = torch.zeros(stop - start, dtype=torch.float64)
        adjusted = torch.full((stop - start, n_levels), math.nan, dtype=torch.float64)
        for level in range(n_levels):
            n_classes = hierarchy.n_classes(level)
            counts = torch.zeros(stop - start, n_classes, dtype=torch.float64)
            counts.scatter_add_(1, labels[:, level][b.index_ct], valid.double())
            purity = (counts / n_top_c.clamp_min(1)[:, None]).max(dim=1).values
            p0 = p0_l[level]
            adjusted[:, level] = (purity - p0) / (1 - p0) if p0 < 1 else math.nan
            same_pairs += (counts * (counts - 1)).sum(dim=1) / 2
            out.purity_kl[sl, level] = torch.where(scored, purity, math.nan).numpy()
            d = min(n_dist, n_classes)
            count, cls = counts.topk(d, dim=1)
            cls = torch.where(count > 0, cls, -1)
            out.dist_class_kld[sl, level, :d] = cls.numpy()
            out.dist_count_kld[sl, level, :d] = count.int().numpy()
            out.top_class_kl[sl, level] = cls[:, 0].numpy()
        best = adjusted.max(dim=1, keepdim=True).values
        levels = torch.arange(n_levels).expand(stop - start, -1)
        level_c = torch.where(adjusted >= best - level_tol, levels, -1).max(dim=1).values
        out.level_k[sl] = torch.where(scored, level_c, -1).numpy()
        out.adjusted_kl[sl] = torch.where(scored[:, None], adjusted, math.nan).numpy()
        depth = same_pairs / (n_top_c * (n_top_c - 1) / 2).clamp_min(1)
        out.depth_k[sl] = torch.where(scored, depth, math.nan).numpy()
        out.show_row_ks[sl] = torch.where(valid[:, :n_show], b.index_ct[:, :n_show], -1).numpy()
        out.show_value_ks[sl] = b.value_ct[:, :n_show].numpy()
    out.density_k = out.n_fired_k / n_images
    return out


def containment(
    acts: ActsLike,
    table: LatentTable,
    budget: float = 5e8,
    min_support: int = 5,
    seed: int = 0,
    block: int = 1024,
) -> None:
    """For each latent A, the latent B whose firing set best contains A's (A fires ⊂ B
    fires): ``containment = |A ∩ B| / |A|`` = P(B fires | A fires). Among the B that fire
    at least as often as A (ties: the lower id contains), the one with the largest
    ``P(B | A) - P(B)`` is chosen, so a latent that fires on almost every image (which
    "contains" everything) does not win over a tight superset. Sets in ``table`` (filled
    in place): ``contain_parent_k`` (-1: none, or A fires on < ``min_support`` images) and
    ``contain_score_k`` (its containment).

    The intersections are one sparse product whose cost is ``sum_i nnz_i^2`` (``nnz_i``:
    latents firing on image ``i``): over every image when that fits ``budget``, else over
    a seeded random subset of images that does (``contain_images`` says how many)."""
    n_images, n_latents = int(acts.shape[0]), n_latents_of(acts)
    cost_n = table.image_nnz_n.astype(np.float64) ** 2
    if cost_n.sum() <= budget:
        subset = np.arange(n_images)
    else:
        order = np.random.default_rng(seed).permutation(n_images)
        subset = np.sort(order[: max(1, int(np.searchsorted(np.cumsum(cost_n[order]), budget)))])
    full = len(subset) == n_images
    rows_parts, cols_parts = [], []
    if not isinstance(acts, torch.Tensor):  # the stored entries as they are
        stored = sp.csc_matrix(acts if full else acts[subset])
        stored.sum_duplicates()
        coo = stored.tocoo()
        positive = coo.data > 0
        rows_parts.append(coo.row[positive].astype(np.int32))
        cols_parts.append(coo.col[positive].astype(np.int32))
    for start in range(0, n_latents if isinstance(acts, torch.Tensor) else 0, block):
        a = column_block(acts, start, min(start + block, n_latents))
        if not full:
            a = a[torch.as_tensor(subset, device=a.device)]
        r, c = (a > 0).nonzero(as_tuple=True)
        rows_parts.append(r.cpu().numpy().astype(np.int32))
        cols_parts.append((c + start).cpu().numpy().astype(np.int32))
    rows, cols = np.concatenate(rows_parts), np.concatenate(cols_parts)
    n_sub = len(subset)
    fires = sp.csc_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_sub, n_latents))
    del rows, cols, rows_parts, cols_parts
    fires_t = fires.T.tocsr()
    support = np.asarray(fires.sum(axis=0)).ravel()
    p_b = support / max(n_sub, 1)
    parent = np.full(n_latents, -1, np.int64)
    score = np.full(n_latents, math.nan)
    for start in range(0, n_latents, block):
        stop = min(start + block, n_latents)
        inter = (fires_t[start:stop] @ fires).tocoo()
        a_id = inter.row.astype(np.int64) + start
        b_id = inter.col.astype(np.int64)
        s_a, s_b = support[a_id], support[b_id]
        ok = (a_id != b_id) & (s_a >= min_support) & ((s_b > s_a) | ((s_b == s_a) & (b_id < a_id)))
        a_id, b_id, cont = a_id[ok], b_id[ok], inter.data[ok] / s_a[ok]
        if not len(a_id):
            continue
        key = cont - p_b[b_id]
        order = np.lexsort((-key, a_id))
        first = np.unique(a_id[order], return_index=True)[1]
        best = order[first]
        parent[a_id[best]] = b_id[best]
        score[a_id[best]] = cont[best]
    table.contain_parent_k, table.contain_score_k, table.contain_images = parent, score, n_sub
