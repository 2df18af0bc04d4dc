"""Comparing backbones by their image-tower weights: a light module (no torch), so the
comparison table (hsae.compare) can warn without importing the backbones."""

from __future__ import annotations

from collections.abc import Mapping


def same_image_tower_warning(fingerprints_by_name: Mapping[str, str]) -> str | None:
    """A plain warning when backbones of one sweep/comparison share image-tower weights.

    ``fingerprints_by_name``: backbone name -> ``Backbone.fingerprint()`` (or the
    ``spec.backbone.fingerprint`` of a cache manifest). None when all towers differ.
    """
    groups: dict[str, list[str]] = {}
    for name, fingerprint in fingerprints_by_name.items():
        groups.setdefault(fingerprint, []).append(name)
    shared = [(fp, sorted(names)) for fp, names in sorted(groups.items()) if len(names) > 1]
    if not shared:
        return None
    lines = [
        f"backbones {' and '.join(names)} have the same image-tower weights "
        f"(fingerprint {fp}): their image activations are identical, so any difference "
        "between their vision SAEs is noise from SAE seeds, not a difference between the "
        "backbones (e.g. RE-CLIP fine-tunes only CLIP's text tower)"
        for fp, names in shared
    ]
    return "; ".join(lines)
