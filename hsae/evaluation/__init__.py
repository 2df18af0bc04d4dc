"""Evaluate a finished run from its run dir alone (step 3), or a backbone's layer (step 1).

- ``inputs``: the run's ``cfg.json`` and backbone, and one pass over a cache (``image_pass``);
- ``step3``: ``evaluate_run`` (SAE, interpretability, fidelity, names, control metrics);
- ``step1``: ``hierarchy_of_backbone`` / ``hierarcaps_of_backbone``;
- ``control``: steering a backbone with one latent (clamp edits, hit rate, zero-shot);
- ``naming``: latent names in a joint image-text space;
- ``report``: expected metric names, reasons for NaNs, W&B and the text table.

Metric names: docs/metrics.md. The names below are the package's public interface.
"""

from hsae.evaluation.control import control_metrics
from hsae.evaluation.inputs import (
    RUN_CFG_KEYS,
    ImagePass,
    image_pass,
    latent_groups,
    make_run_backbone,
    read_run_cfg,
    run_configs,
    run_dataset,
)
from hsae.evaluation.naming import automatic_names, read_vocabulary
from hsae.evaluation.report import (
    HIERARCAPS_METRICS,
    NAN_REASONS,
    account_for,
    expected_metrics,
    expected_step1,
    format_table,
    skip_reason,
)
from hsae.evaluation.step1 import hierarcaps_of_backbone, hierarchy_of_backbone
from hsae.evaluation.step3 import evaluate_run, interpretability

__all__ = [
    "HIERARCAPS_METRICS",
    "NAN_REASONS",
    "RUN_CFG_KEYS",
    "ImagePass",
    "account_for",
    "automatic_names",
    "control_metrics",
    "evaluate_run",
    "expected_metrics",
    "expected_step1",
    "format_table",
    "hierarcaps_of_backbone",
    "hierarchy_of_backbone",
    "image_pass",
    "interpretability",
    "latent_groups",
    "make_run_backbone",
    "read_run_cfg",
    "read_vocabulary",
    "run_configs",
    "run_dataset",
    "skip_reason",
]
