"""Metrics, each a torchmetrics ``Metric`` (correct under DDP)."""

from hsae.sae.metrics import (
    FVU,
    L0,
    L1,
    MSE,
    DeadFraction,
    DenseFraction,
    FeatureDensity,
    Shrinkage,
    make_sae_metrics,
    max_decoder_cosine,
)

__all__ = [
    "FVU",
    "L0",
    "L1",
    "MSE",
    "DeadFraction",
    "DenseFraction",
    "FeatureDensity",
    "Shrinkage",
    "make_sae_metrics",
    "max_decoder_cosine",
]
