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

One module per metric family: ``top`` (top images, purity, depth), ``monosemanticity``,
``overlap`` (uniqueness), ``moran``, ``probing`` (sparse probing), ``absorption``,
``fidelity``, ``naming`` (joint-space names); ``summary.interp_metrics`` gathers them.
"""

from hsae.metrics.interp.absorption import AbsorptionResult, absorption, sibling_difference_latents
from hsae.metrics.interp.fidelity import fidelity_metrics
from hsae.metrics.interp.monosemanticity import monosemanticity_score
from hsae.metrics.interp.moran import MoranAccumulator, morans_i
from hsae.metrics.interp.naming import (
    JointMap,
    LatentNames,
    NameReport,
    centred_text,
    fit_joint_map,
    name_latents,
    name_report,
)
from hsae.metrics.interp.overlap import top_set_overlap
from hsae.metrics.interp.probing import mean_difference_latents, sparse_probing
from hsae.metrics.interp.summary import interp_metrics
from hsae.metrics.interp.top import (
    LatentPurity,
    TopClass,
    TopImages,
    group_taxonomy_depth,
    label_purity,
    top_class,
    top_images,
)

__all__ = [
    "AbsorptionResult",
    "JointMap",
    "LatentNames",
    "LatentPurity",
    "MoranAccumulator",
    "NameReport",
    "TopClass",
    "TopImages",
    "absorption",
    "centred_text",
    "fidelity_metrics",
    "fit_joint_map",
    "group_taxonomy_depth",
    "interp_metrics",
    "label_purity",
    "mean_difference_latents",
    "monosemanticity_score",
    "morans_i",
    "name_latents",
    "name_report",
    "sibling_difference_latents",
    "sparse_probing",
    "top_class",
    "top_images",
    "top_set_overlap",
]
