"""Step 1: how hierarchically consistent a representation is, given the label tree.

Every function takes features ``feats_nd`` (one row per image, e.g. a backbone's pooled
activations at one layer), labels ``labels_nl`` (one class per level, coarse to fine) and
the ``Hierarchy`` they come from. Tensors stay on the device they arrive on, so the same
calls run batched on a GPU. ``hierarchy_metrics`` returns every number under its documented
name (docs/metrics.md):

- ``hier/cpcc``: CPCC (Zeng et al. 2023), Pearson correlation between the tree distance of
  pairs of leaf classes and the Euclidean distance of their class-mean features.
- ``hier/probe_acc@<level>``, ``hier/full_path_acc``, ``hier/consistency``: linear probes,
  one per level, trained on a stratified split and scored on the held-out part.
- ``hier/mistake_severity``, ``hier/hdist@<k>`` (Bertinetto et al. 2020): height of the
  lowest common ancestor (LCA) of prediction and truth, from the leaf-level probe.
- ``hier/ami@<level>``: Ward clustering cut at each level's number of classes, adjusted
  mutual information with that level's labels.

One module per job: ``inputs`` (checks and the stratified split, shared with
``hsae.metrics.interp``), ``probes`` (linear-probe trainers, shared with interp and control),
``geometry`` (CPCC, clustering AMI), ``predictions`` (the probes' predictions against the
tree); this module gathers them under their documented names.
"""

from __future__ import annotations

from collections.abc import Sequence

from hsae.cpcc import class_means
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarchy.geometry import clustering_ami, cpcc
from hsae.metrics.hierarchy.inputs import (
    ArrayLike,
    as_features,
    as_labels,
    level_index,
    require_classes,
    stratified_split,
)
from hsae.metrics.hierarchy.predictions import (
    ProbeResult,
    hierarchical_distance_at_k,
    lca_height,
    mistake_severity,
    path_consistency,
    probe_consistency,
)
from hsae.metrics.hierarchy.probes import (
    LinearProbe,
    balanced_accuracy,
    binary_probe_logits,
    fit_binary_probes,
    fit_linear_probe,
    fit_ovr_probes,
)
from hsae.metrics.results import Metrics

__all__ = [
    "ArrayLike",
    "LinearProbe",
    "ProbeResult",
    "as_features",
    "as_labels",
    "balanced_accuracy",
    "binary_probe_logits",
    "class_means",
    "clustering_ami",
    "cpcc",
    "fit_binary_probes",
    "fit_linear_probe",
    "fit_ovr_probes",
    "hierarchical_distance_at_k",
    "hierarchy_metrics",
    "lca_height",
    "level_index",
    "mistake_severity",
    "path_consistency",
    "probe_consistency",
    "require_classes",
    "stratified_split",
]


def hierarchy_metrics(
    feats_nd: ArrayLike,
    labels_nl: ArrayLike,
    hierarchy: Hierarchy,
    *,
    seed: int = 0,
    test_fraction: float = 0.3,
    weight_decay: float = 1e-4,
    hdist_ks: Sequence[int] = (1, 5),
    ami_max_points: int = 4000,
) -> dict[str, float]:
    """Every step-1 metric of one representation, as a flat dict of documented names
    (``Metrics``: an undefined one is NaN, with its reason in ``.skipped``)."""
    feats = as_features(feats_nd)
    labels = as_labels(labels_nl, hierarchy, feats.shape[0], feats.device)
    names = hierarchy.level_names
    out = Metrics()
    out.set_or_undefined(
        "hier/cpcc",
        cpcc(feats, labels, hierarchy),
        "the class means are all equally far apart (collapsed to one point?), so their "
        "distances cannot correlate with the tree",
    )
    probes = probe_consistency(
        feats, labels, hierarchy, test_fraction=test_fraction, seed=seed, weight_decay=weight_decay
    )
    for name, acc in zip(names, probes.acc_l, strict=True):
        out[f"hier/probe_acc@{name}"] = acc
    out["hier/full_path_acc"] = probes.full_path_acc
    out["hier/consistency"] = probes.consistency
    out.set_or_undefined(
        "hier/mistake_severity",
        mistake_severity(probes.pred_nl[:, -1], probes.true_nl[:, -1], hierarchy),
        "the leaf probe made no mistakes on the held-out images",
    )
    for k in hdist_ks:
        if k <= hierarchy.n_leaves:
            out[f"hier/hdist@{k}"] = hierarchical_distance_at_k(
                probes.leaf_logits_nc, probes.true_nl[:, -1], hierarchy, k
            )
        else:
            out.undefined(
                f"hier/hdist@{k}", f"top-{k} needs >= {k} leaf classes; the tree has only "
                f"{hierarchy.n_leaves} leaves"
            )  # fmt: skip
    amis = clustering_ami(feats, labels, hierarchy, max_points=ami_max_points, seed=seed)
    for name, ami in zip(names, amis, strict=True):
        out[f"hier/ami@{name}"] = ami
    return out
