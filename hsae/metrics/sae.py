"""Moved to ``hsae.sae.metrics`` (the SAE's own metrics, which training logs too); this
re-export stays until every importer switched."""

from hsae.sae.metrics import (  # noqa: F401
    DENSE_THRESHOLD,
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
