"""Probe fidelity: a probe's accuracy on the SAE's reconstructions and ablations."""

from __future__ import annotations

import torch

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy import (
    ArrayLike,
    as_features,
    as_labels,
    fit_linear_probe,
    require_classes,
    stratified_split,
)
from hsae.metrics.results import Metrics


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
