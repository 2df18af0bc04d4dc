"""``interp_metrics``: every interpretability family under its documented name."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
)
from hsae.metrics.interp.absorption import _absorption_metrics, _nanmean
from hsae.metrics.interp.monosemanticity import monosemanticity_score
from hsae.metrics.interp.overlap import top_set_overlap
from hsae.metrics.interp.probing import sparse_probing
from hsae.metrics.interp.top import _acts_and_labels, group_taxonomy_depth, label_purity
from hsae.metrics.results import Metrics

log = logging.getLogger(__name__)


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
