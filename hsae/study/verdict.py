"""Metric families and the plain-language verdict.

Each family has one primary metric, fixed here before any study runs (never chosen after
seeing results), and secondary metrics reported beside it. The verdict on a family reads
only the primary metric's interval for treatment minus baseline, turned to the metric's
better direction: above 0 -> supported, below 0 -> contradicted, covering 0 ->
inconclusive at this size. The step-1 precondition is the same rule on the step-1 metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hsae.study.compare import Effect
    from hsae.study.config import StudyConfig


@dataclass(frozen=True)
class Metric:
    key: str
    better: int  # +1: higher is better; -1: lower is better; 0: not a direction (descriptive)


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    primary: Metric
    secondary: tuple[Metric, ...] = field(default_factory=tuple)
    vision: bool = True  # computed from image activations: identical towers cannot differ


# Level-averaged keys (``@mean``) are derived by ``derived_metrics`` from the per-level ones,
# so a family reads the same key on every dataset, whatever its level names.
FAMILIES = (
    Family(
        "quality",
        "SAE quality (reconstruction at matched L0)",
        Metric("fvu", -1),
        (Metric("dead_fraction", -1),),
    ),
    Family(
        "hierarchy",
        "hierarchy alignment of latents",
        Metric("interp/purity@mean", +1),
        (Metric("interp/entropy@mean", -1), Metric("interp/taxonomy_depth", 0)),
    ),
    Family(
        "monosemanticity",
        "monosemanticity",
        Metric("interp/ms", +1),
        (Metric("interp/uniqueness", +1),),
    ),
    Family(
        "absorption",
        "feature absorption",
        Metric("interp/absorption_rate", -1),
        (Metric("interp/absorption_fraction", -1),),
    ),
    Family(
        "probing",
        "sparse probing",
        Metric("interp/sparse_probe@k1/mean", +1),
        (Metric("interp/sparse_probe@k5/mean", +1), Metric("fidelity/recovered@mean", +1)),
    ),
    Family(
        "control",
        "control (steering with latents)",
        Metric("control/hit_gain", +1),
        (Metric("control/delta_p", +1),),
    ),
    # What differs for backbones with the same image tower: names through the text tower.
    Family(
        "naming",
        "automatic names through the text tower",
        Metric("interp/name_agreement@mean", +1),
        (Metric("interp/name_score", +1),),
        vision=False,
    ),
)
STEP1_SECONDARY = (
    Metric("hier/consistency", +1),
    Metric("hier/full_path_acc", +1),
    Metric("hier/mistake_severity", -1),
    Metric("hier/ami@mean", +1),
)
# Step-1 scores with a chance level (docs/metrics.md): a precondition on one of them still
# has a meaning when the baseline kind cannot have the score (a ViT has no segment tree, so
# no part_whole/*): the treatment's interval is then read against this level.
STEP1_CHANCE = {
    "part_whole/part_iou_over_chance": 0.0,
    "part_whole/object_iou_over_chance": 0.0,
    "part_whole/assignment_confidence_over_chance": 0.0,
    "part_whole/nesting_adjusted": 0.0,
}
JOINT_METRICS = (Metric("hier/kendall_tau", +1), Metric("hier/retrieval_precision", +1))
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive at this size"
NOT_APPLICABLE = "not applicable"
DESCRIPTIVE = "descriptive (no better direction)"


def _mean_of(metrics: dict[str, Any], prefix: str, suffix: str = "") -> float | None:
    values = [
        float(v)
        for k, v in metrics.items()
        if k.startswith(prefix)
        and k.endswith(suffix)
        and "@mean" not in k
        and v is not None
        and "/" not in k[len(prefix) :].removesuffix(suffix)
    ]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


def derived_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Level-averaged keys the families read (``interp/purity@mean`` = mean over levels of
    ``interp/purity@<level>``, ...) and ``control/hit_gain`` = hit rate minus its baseline."""
    out: dict[str, float] = {}
    for prefix, suffix, key in (
        ("interp/purity@", "", "interp/purity@mean"),
        ("interp/entropy@", "", "interp/entropy@mean"),
        ("interp/sparse_probe@k1/", "", "interp/sparse_probe@k1/mean"),
        ("interp/sparse_probe@k5/", "", "interp/sparse_probe@k5/mean"),
        ("fidelity/recovered@", "", "fidelity/recovered@mean"),
        ("interp/name_agreement@", "", "interp/name_agreement@mean"),
        ("hier/ami@", "", "hier/ami@mean"),
        ("control/delta_p@", "", "control/delta_p"),
    ):
        value = _mean_of(metrics, prefix, suffix)
        if value is not None:
            out[key] = value
    gains = [
        float(v) - float(metrics[k.replace("hit_rate@", "hit_rate_baseline@")])
        for k, v in metrics.items()
        if k.startswith("control/hit_rate@")
        and k.replace("hit_rate@", "hit_rate_baseline@") in metrics
    ]
    if gains:
        out["control/hit_gain"] = sum(gains) / len(gains)
    return out


def call(effect: Effect | None, better: int) -> str:
    """supported / contradicted / inconclusive from the interval in the better direction."""
    if better == 0:
        return DESCRIPTIVE
    if effect is None:
        return NOT_APPLICABLE
    if not (math.isfinite(effect.ci_low) and math.isfinite(effect.ci_high)):
        return INCONCLUSIVE  # no replication at any level: no interval
    low, high = sorted((better * effect.ci_low, better * effect.ci_high))
    if low > 0:
        return SUPPORTED
    if high < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def falsifier(status: str, treatment: str, baseline: str, metric: str, better: int) -> str:
    side = "above" if better > 0 else "below"
    other = "below" if better > 0 else "above"
    if status == SUPPORTED:
        return (
            f"a replication with more backbone seeds per kind whose interval for {treatment} - "
            f"{baseline} on {metric} covers 0 or lies {other} it"
        )
    if status == CONTRADICTED:
        return (
            f"a replication with more backbone seeds per kind whose interval for {treatment} - "
            f"{baseline} on {metric} covers 0 or lies {side} it"
        )
    if status == INCONCLUSIVE:
        return (
            f"more backbone seeds per kind: an interval {side} 0 would support it, one {other} "
            "0 would contradict it"
        )
    return ""


def make_verdict(study: StudyConfig, comparison: dict[str, Any]) -> dict[str, Any]:
    """Per layer position: the precondition, then one plain-language line per family."""
    base, treat = study.baseline.label, study.treatment.label
    towers = comparison["identical_towers"]
    out = []
    for entry in comparison["layers"]:
        pre_metric, pre = study.step1_metric, entry["step1"][study.step1_metric]
        joint = entry["joint"].get(JOINT_METRICS[0].key)
        if towers and joint is not None and joint["effect"] is not None:
            # Identical image towers cannot differ in step 1 on images: the precondition is
            # the joint image-text hierarchy, which is what the text towers change.
            pre_metric, pre = f"{JOINT_METRICS[0].key} (joint image-text)", joint
        holds = pre["call"] == "supported"
        families = []
        for family in FAMILIES:
            metric = family.primary
            info = entry["families"][family.key]["metrics"].get(metric.key)
            status = info["call"] if info else NOT_APPLICABLE
            reason = ""
            if towers and family.vision:
                status, reason = (
                    NOT_APPLICABLE,
                    (
                        "identical image towers: the vision SAEs see the same activations, so any "
                        "difference is SAE-seed noise"
                    ),
                )
            elif info is None or info["effect"] is None:
                status = NOT_APPLICABLE
                reason = "not computed for these backbones; step 3 logs why"
            families.append(
                {
                    "family": family.key,
                    "title": family.title,
                    "metric": metric.key,
                    "better": "higher" if metric.better > 0 else "lower",
                    "status": status,
                    "reason": reason,
                    "effect": None if info is None else info["effect"],
                    "falsified_by": falsifier(status, treat, base, metric.key, metric.better),
                }
            )
        out.append(
            {
                "layer_pos": entry["layer_pos"],
                "layers": entry["layers"],
                "precondition": {
                    "metric": pre_metric,
                    "holds": holds,
                    "status": pre["call"],
                    "effect": pre["effect"],
                    # Not None: the treatment alone against this chance level (the
                    # baseline kind has no such score).
                    "against_chance": pre.get("against_chance"),
                },
                "families": families,
            }
        )
    return {"treatment": treat, "baseline": base, "hypothesis": study.hypothesis, "layers": out}
