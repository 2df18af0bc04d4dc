"""Latent names in a backbone's joint image-text space (``automatic_names``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.cache import ActivationCache
from hsae.errors import HsaeError
from hsae.evaluation.inputs import ImagePass, run_dataset
from hsae.sae.base import SparseAutoencoder

log = logging.getLogger(__name__)


def read_vocabulary(path: str | Path) -> list[str]:
    """``names_vocab``: one entry per line, used as written (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise HsaeError(
            f"names_vocab={path} is not a file; pass a text file with one vocabulary entry per "
            "line, or names_vocab=null to name latents by the dataset's class names"
        )
    entries = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not entries:
        raise HsaeError(f"names_vocab={path} has no entries; write one entry per line")
    return entries


@torch.no_grad()
def _encode_text(backbone: Any, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([
        backbone.encode_text(texts[s : s + batch_size]).float().cpu()
        for s in range(0, len(texts), batch_size)
    ])  # fmt: skip


def automatic_names(
    sae: SparseAutoencoder, cache: ActivationCache, images: ImagePass, cfg: dict, split: str,
    backbone: Any, vocabulary: list[str] | None = None, n_top: int = 50, seed: int = 0,
    max_images: int = 2048, batch_size: int = 64, template: str = "a photo of a {}.",
) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """Names latents in the joint image-text space of a backbone with a text tower
    (``hsae.metrics.interp.name_report``): a ridge map from the hooked layer's features
    (the SAE's inputs, pooled per image) to the tower's final image embedding is fit on up
    to ``max_images`` images of the split (seeded), and carries each decoder row into the
    joint space, where the nearest class name (prompt ``template``) or ``vocabulary`` entry
    names it. Returns the metrics (``interp/names_map_r2``: the map's held-out R^2) and
    the per-latent table ``{"columns", "rows"}``."""
    from hsae.metrics.interp import fit_joint_map, name_report

    device = next(backbone.model.parameters()).device
    dataset = run_dataset(cfg, split, backbone.preprocess)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images.image_ids))[:max_images])
    layer = cfg["backbone"]["layer"]
    emb = []
    for start in range(0, len(chosen), batch_size):
        ids = images.image_ids[chosen[start : start + batch_size]]
        batch = torch.stack([dataset[int(i)][0] for i in ids]).to(device)
        emb.append(backbone.forward_edited(batch, layer, None).float().cpu())
    joint = fit_joint_map(images.feats_id[torch.as_tensor(chosen)], torch.cat(emb), seed=seed)
    hierarchy = cache.hierarchy
    class_text = [
        _encode_text(backbone, [template.format(c) for c in names])
        for names in hierarchy.class_names
    ]
    report = name_report(
        sae.decoder_rows().detach().float().cpu(), joint.map_de, images.acts_ik,
        cache.labels_nl[images.image_ids], hierarchy, class_text, vocabulary,
        None if vocabulary is None else _encode_text(backbone, vocabulary), n_top=n_top,
    )  # fmt: skip
    log.info(
        "names: joint-space map fit on %d images, held-out R^2 %.3f (ridge %.0e)",
        len(chosen), joint.r2, joint.ridge,
    )  # fmt: skip
    metrics = {"interp/names_map_r2": joint.r2, **report.metrics}
    return metrics, {"columns": report.columns, "rows": report.rows}
