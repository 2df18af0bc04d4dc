"""Metrics, each a torchmetrics ``Metric`` (correct under DDP)."""

from hsae.metrics.sae import FVU, L0, MSE, DeadFraction, make_sae_metrics

__all__ = ["FVU", "L0", "MSE", "DeadFraction", "make_sae_metrics"]
