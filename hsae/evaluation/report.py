"""What an evaluation writes: the metric names expected per family, the reasons for the
ones without a value (``skipped``), the JSON record, the W&B eval run and the text table."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path
from typing import Any

# Why a metric that applies to the run can still have no value on its data (NaN).
NAN_REASONS = (
    ("interp/top_overlap", "needs 2 latents firing on >= 5 images (pairs of top-image sets)"),
    ("interp/uniqueness", "needs 2 latents firing on >= 5 images (pairs of top-image sets)"),
    ("interp/taxonomy_depth/group*", "no latent of this group fires on >= 5 images"),
    ("interp/name_agreement@*", "no latent has a clear majority class at this level (> 0.5 of "
     "its top images): interp/majority_latents@<level> = 0"),
    ("interp/name_score", "no latent fires on >= 5 images"),
    ("interp/sparse_probe@*", "no class of this level has images on both sides of the probe's "
     "training and held-out split"),
    ("interp/absorption*", "no parent class with images its probe detects"),
    ("interp/ms", "no latent fires on 2 or more images with distinct activations"),
    ("fidelity/recovered@*", "ablation does not change the probe's accuracy (original = "
     "ablated): there is no gap to recover"),
    ("fidelity/zero_shot_recovered@*", "ablation does not change the zero-shot accuracy "
     "(original = ablated): there is no gap to recover"),
    ("hier/cpcc", "the class-mean distances or the tree distances are constant (collapsed "
     "class means): the correlation is undefined"),
    ("hier/mistake_severity", "the leaf probe makes no mistake on the held-out images"),
    ("hier/hdist@*", "k is more than the number of leaf classes"),
)  # fmt: skip


def expected_metrics(
    level_names: list[str], n_groups: int = 0, probe_ks: tuple[int, ...] = (1, 2, 5)
) -> dict[str, list[str]]:
    """Step 3's metric names by family (``docs/metrics.md``), for a hierarchy with these
    levels (coarse to fine) and ``n_groups`` Matryoshka groups. Control and zero-shot are
    at the coarsest level."""
    top, parents = level_names[0], level_names[:-1]
    return {
        "interp": [
            "interp/scored_latents", "interp/taxonomy_depth",
            *(f"interp/{m}@{lv}" for m in ("purity", "entropy", "level_fraction")
              for lv in level_names),
            *(f"interp/taxonomy_depth/group{g}" for g in range(n_groups)),
            "interp/ms", "interp/top_overlap", "interp/uniqueness", "interp/moran_i",
            *(f"interp/sparse_probe@k{k}/{lv}" for k in probe_ks for lv in level_names),
            *(f"interp/absorption_{m}@{lv}" for m in ("rate", "fraction") for lv in parents),
            "interp/absorption_rate", "interp/absorption_fraction",
        ],
        "fidelity": [
            *(f"fidelity/probe_acc@{lv}/{kind}" for lv in level_names
              for kind in ("original", "reconstructed", "ablated")),
            *(f"fidelity/recovered@{lv}" for lv in level_names),
        ],
        "names": [
            "interp/names_map_r2", "interp/name_score",
            *(f"interp/{m}@{lv}" for m in ("name_agreement", "majority_latents")
              for lv in level_names),
        ],
        "control": [
            *(f"control/{m}@{top}" for m in ("hit_rate", "hit_rate_baseline", "delta_p")),
            "control/n_latents",
        ],
        "zero_shot": [
            *(f"fidelity/zero_shot/{kind}@{top}" for kind in ("original", "spliced", "ablated")),
            f"fidelity/zero_shot_recovered@{top}",
        ],
    }  # fmt: skip


HIERARCAPS_METRICS = ("hier/kendall_tau", "hier/retrieval_precision", "hier/retrieval_recall")


def expected_step1(level_names: list[str], hdist_ks: tuple[int, ...] = (1, 5)) -> list[str]:
    """Step 1's metric names (``hierarchy_metrics``) for a hierarchy with these levels."""
    return [
        "hier/cpcc", *(f"hier/probe_acc@{lv}" for lv in level_names), "hier/full_path_acc",
        "hier/consistency", "hier/mistake_severity", *(f"hier/hdist@{k}" for k in hdist_ks),
        *(f"hier/ami@{lv}" for lv in level_names),
    ]  # fmt: skip


def skip_reason(name: str, skipped: dict[str, str]) -> str | None:
    """The reason ``skipped`` gives for ``name``: its own entry, or a pattern (``control/*``)."""
    if name in skipped:
        return skipped[name]
    return next((why for key, why in skipped.items() if fnmatch.fnmatchcase(name, key)), None)


def account_for(
    metrics: dict[str, float], skipped: dict[str, str], expected: list[str]
) -> dict[str, float]:
    """Nothing vanishes: every ``expected`` name is in the result (NaN when it was not
    computed) and every NaN has a reason in ``skipped`` (filled in place): the one given,
    else ``NAN_REASONS``'s for that metric, else a pointer to its definition."""
    out = dict(metrics)
    for name in expected:
        if name not in out:
            out[name] = math.nan
            if skip_reason(name, skipped) is None:
                skipped[name] = "not computed on this data (the metric function gave no value)"
    for name, value in out.items():
        if isinstance(value, float) and math.isnan(value) and skip_reason(name, skipped) is None:
            skipped[name] = next(
                (why for key, why in NAN_REASONS if fnmatch.fnmatchcase(name, key)),
                "undefined on this data (NaN); docs/metrics.md says when it has no value",
            )
    return out


def _log_eval_to_wandb(
    run_dir: Path, cfg: dict, metrics: dict[str, float], media: dict[str, Any] | None = None
) -> None:
    """When the run was tracked in W&B, its evaluation becomes a W&B run of job_type
    ``eval`` in the same project and group, named ``<run name>/eval``, with the run's flat
    config, so the dashboard puts step-3 metrics next to training's (and ``media``, e.g.
    the per-latent names table ``latents/names``)."""
    from hsae.config import LoggerConfig, flatten
    from hsae.tracking import log_standalone_run

    logger = cfg.get("config", {}).get("logger", {})
    if logger.get("kind") != "wandb":
        return
    tracking = cfg.get("tracking", {})
    fields = LoggerConfig.__dataclass_fields__
    logger_cfg = LoggerConfig(**{k: v for k, v in logger.items() if k in fields})
    name = f"{tracking.get('name') or run_dir.name}/eval"
    config_flat = flatten(cfg["config"])
    log_standalone_run(
        logger_cfg, run_dir / "eval", name, tracking.get("group"), "eval", config_flat, metrics,
        media,
    )  # fmt: skip


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{k:<{width}}  {v:.6g}" for k, v in metrics.items()]
    return "\n".join(lines)
