"""Moved to ``hsae.evaluation.control``; this re-export stays until every importer switched."""

from hsae.evaluation.control import (  # noqa: F401
    ControlResult,
    clamp_edit,
    clamp_hit_rate,
    clamp_values,
    fit_readout,
    hooked_rows,
    latent_direction,
    spliced_zero_shot,
)
