"""Moved to ``hsae.training.latents`` (what training's latent report collects); this
re-export stays until every importer switched."""

from hsae.training.latents import LatentStats, collect_latent_stats, highlight_patch  # noqa: F401
