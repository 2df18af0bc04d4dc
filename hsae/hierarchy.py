"""Moved to ``hsae.label_tree`` (the label tree; ``hsae.metrics.hierarchy`` is step 1's
metrics, ``hsae.sae.hierarchical`` the H-SAE); this re-export stays until every importer
switched."""

from hsae.label_tree import Hierarchy  # noqa: F401
