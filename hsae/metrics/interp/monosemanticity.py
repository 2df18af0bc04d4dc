"""Monosemanticity score (MS) of latents against a reference image embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hsae.errors import HsaeError
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
)


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
