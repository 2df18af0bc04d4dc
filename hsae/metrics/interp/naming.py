"""Latent names: a ridge map into a joint image-text space and the nearest text entry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
)
from hsae.metrics.interp.absorption import _nanmean
from hsae.metrics.interp.top import _acts_and_labels, top_class


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
