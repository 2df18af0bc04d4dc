"""HierarCaps-format data and the radial-embedding hierarchy metrics of Alper &
Averbuch-Elor (ECCV 2024), for backbones with a joint image-text space (CLIP, RE-CLIP, MERU).

A HierarCaps CSV has one row per image: ``captions`` is a chain of captions from general to
specific joined by ``" => "`` (four in the released data), ``image_url`` ends with the image's
file name. Images are read from a local folder only; nothing is downloaded.

Radial embedding: the *root* is the embedding of the empty caption, and a caption's
genericness is its distance from the root (generic captions lie close to it, specific ones
far). The metrics take embeddings, so they are computed (and tested) without a text model:

- ``hier/kendall_tau``: per chain, Kendall's tau-b between the captions' distances from the
  root and their true order (general -> specific); mean over chains. 1 = every chain is
  ordered outward from the root; ~0 = no relation.
- ``hier/retrieval_precision``, ``hier/retrieval_recall``: hierarchical retrieval over radius
  thresholds. For each radius ``r`` (``n_thresholds`` quantiles of the candidates' distances
  from the root), every image retrieves its most similar caption (cosine) among the
  candidates no farther than ``r`` from the root; sweeping ``r`` outward retrieves a
  general-to-specific set of captions. Precision = the fraction of distinct retrieved
  captions that belong to the image's own chain; recall = the fraction of the chain's
  distinct captions retrieved. Both averaged over images. Candidates are the distinct
  captions of all chains (a caption string shared by several chains is one candidate, and
  counts as correct for each of them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsae.data.hierarcaps import SEPARATOR, HierarCaps, load_hierarcaps  # noqa: F401 - re-exported
from hsae.errors import HsaeError

log = logging.getLogger(__name__)


def _check_embeddings(
    text_emb_cle: torch.Tensor, root_e: torch.Tensor, image_emb_ne: torch.Tensor | None = None
) -> None:
    if text_emb_cle.ndim != 3 or text_emb_cle.shape[1] < 2:
        raise HsaeError(
            f"text embeddings must be [n_chains, n_levels >= 2, e], got {tuple(text_emb_cle.shape)}"
        )
    e = text_emb_cle.shape[2]
    if root_e.shape != (e,):
        raise HsaeError(
            f"root embedding must be [{e}] (the empty caption's embedding), got {tuple(root_e.shape)}"
        )
    tensors = [text_emb_cle, root_e]
    if image_emb_ne is not None:
        if image_emb_ne.shape != (text_emb_cle.shape[0], e):
            raise HsaeError(
                f"image embeddings must be [{text_emb_cle.shape[0]}, {e}] (one per chain), got "
                f"{tuple(image_emb_ne.shape)}"
            )
        tensors.append(image_emb_ne)
    for t in tensors:
        if not torch.isfinite(t).all():
            raise HsaeError("embeddings contain NaN/Inf; recompute them (check the text model)")


def distance_from_root(emb_xe: torch.Tensor, root_e: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between unit-normalised embeddings and the unit-normalised root
    (CLIP-like spaces compare directions, so both are normalised first)."""
    return (F.normalize(emb_xe.float(), dim=-1) - F.normalize(root_e.float(), dim=-1)).norm(dim=-1)


def kendall_tau_b(x_cl: torch.Tensor, y_cl: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between rows of ``x`` and ``y`` (batched, ``O(l^2)`` per row); NaN for
    a row where either side is constant."""
    dx = torch.sign(x_cl[:, :, None] - x_cl[:, None, :])
    dy = torch.sign(y_cl[:, :, None] - y_cl[:, None, :])
    iu = torch.triu_indices(x_cl.shape[1], x_cl.shape[1], offset=1, device=x_cl.device)
    dx, dy = dx[:, iu[0], iu[1]].double(), dy[:, iu[0], iu[1]].double()
    denom = torch.sqrt((dx != 0).sum(1).double() * (dy != 0).sum(1).double())
    return (dx * dy).sum(1) / denom  # 0/0 -> NaN for constant rows


def radial_kendall_tau(text_emb_cle: torch.Tensor, root_e: torch.Tensor) -> float:
    """Mean over chains of Kendall's tau-b between distance from the root and the true
    general-to-specific order of the chain's captions (chains whose distances are all equal
    are left out)."""
    text = torch.as_tensor(text_emb_cle)
    root = torch.as_tensor(root_e).to(text.device)
    _check_embeddings(text, root)
    dist = distance_from_root(text, root)
    order = torch.arange(text.shape[1], device=text.device).expand(text.shape[0], -1)
    tau = kendall_tau_b(dist, order.to(dist.dtype))
    if torch.isnan(tau).all():
        raise HsaeError("every chain's captions are equally far from the root; tau undefined")
    return float(torch.nanmean(tau))


@dataclass(frozen=True)
class RetrievalResult:
    precision: float
    recall: float
    thresholds_t: torch.Tensor
    """The radii swept."""
    precision_t: torch.Tensor
    """Per radius: fraction of images whose caption retrieved at that radius is in their chain."""


def hierarchical_retrieval(
    image_emb_ne: torch.Tensor,
    text_emb_cle: torch.Tensor,
    root_e: torch.Tensor,
    caption_ids_cl: np.ndarray | torch.Tensor | None = None,
    n_thresholds: int = 50,
) -> RetrievalResult:
    """Hierarchical retrieval precision/recall over radius thresholds (module docstring).

    ``image_emb_ne[i]`` is the image of chain ``i``. ``caption_ids_cl`` (from
    ``HierarCaps.caption_ids_cl``) marks identical caption strings; without it every caption
    of every chain is a distinct candidate.
    """
    image = torch.as_tensor(image_emb_ne).float()
    text = torch.as_tensor(text_emb_cle).float().to(image.device)
    root = torch.as_tensor(root_e).float().to(image.device)
    _check_embeddings(text, root, image)
    n_chains, n_levels, e = text.shape
    if caption_ids_cl is None:
        ids = torch.arange(n_chains * n_levels, device=image.device).view(n_chains, n_levels)
    else:
        ids = torch.as_tensor(np.asarray(caption_ids_cl), device=image.device).long()
        if ids.shape != (n_chains, n_levels):
            raise HsaeError(f"caption_ids must be [{n_chains}, {n_levels}], got {tuple(ids.shape)}")
    if n_thresholds < 1:
        raise HsaeError(f"n_thresholds must be >= 1, got {n_thresholds}")
    # One candidate per distinct caption id (ids made compact), embedded by its first
    # occurrence: identical strings embed identically, so any occurrence would do.
    _, ids = torch.unique(ids, return_inverse=True)
    n_cand = int(ids.max()) + 1
    flat = ids.reshape(-1)
    position = torch.arange(len(flat), device=image.device)
    first = torch.full((n_cand,), len(flat), device=image.device).scatter_reduce(
        0, flat, position, reduce="amin"
    )
    cand = text.reshape(-1, e)[first]
    dist = distance_from_root(cand, root)
    sim = F.normalize(image, dim=-1) @ F.normalize(cand, dim=-1).T  # [n, m]
    gt = torch.zeros(n_chains, n_cand, dtype=torch.bool, device=image.device)
    gt.scatter_(1, ids, True)
    quantiles = torch.linspace(1.0 / n_thresholds, 1.0, n_thresholds, device=image.device)
    thresholds = torch.quantile(dist.double(), quantiles.double()).float()
    # Candidates sorted outward from the root: the ones allowed at radius r are a prefix, so
    # a running argmax of similarity along that order answers every radius at once.
    order = dist.argsort(stable=True)
    run_max = sim[:, order].cummax(dim=1).indices  # [n, m] position of the best so far
    n_allowed = torch.searchsorted(dist[order].contiguous(), thresholds, right=True)
    best_nt = order[run_max[:, (n_allowed - 1).clamp_min(0)]]  # [n, T] candidate ids
    rows = torch.arange(n_chains, device=image.device)
    retrieved = torch.zeros_like(gt)
    retrieved[rows[:, None].expand_as(best_nt), best_nt] = True
    hit_t = gt[rows[:, None], best_nt].double().mean(dim=0)
    n_hit = (retrieved & gt).sum(1).double()
    precision = (n_hit / retrieved.sum(1).double()).mean()
    recall = (n_hit / gt.sum(1).double()).mean()
    return RetrievalResult(float(precision), float(recall), thresholds, hit_t)


def hierarcaps_metrics(
    image_emb_ne: torch.Tensor,
    text_emb_cle: torch.Tensor,
    root_e: torch.Tensor,
    caption_ids_cl: np.ndarray | torch.Tensor | None = None,
    n_thresholds: int = 50,
) -> dict[str, float]:
    """The radial-embedding metrics under their documented names."""
    retrieval = hierarchical_retrieval(
        image_emb_ne, text_emb_cle, root_e, caption_ids_cl, n_thresholds
    )
    return {
        "hier/kendall_tau": radial_kendall_tau(text_emb_cle, root_e),
        "hier/retrieval_precision": retrieval.precision,
        "hier/retrieval_recall": retrieval.recall,
    }
