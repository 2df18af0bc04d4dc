"""Overlap and uniqueness of the latents' top-image sets."""

from __future__ import annotations

import numpy as np
import torch

from hsae.errors import HsaeError
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
)
from hsae.metrics.interp.top import top_images


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
