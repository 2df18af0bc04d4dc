"""Step 1: hierarchy metrics of one backbone layer (``hier/...``), or, for HierarCaps, of its
joint image-text space; written as one JSON record per (backbone, layer, tokens, dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.cache import resolve_device
from hsae.errors import HsaeError
from hsae.evaluation.inputs import image_features
from hsae.evaluation.report import HIERARCAPS_METRICS, account_for, expected_step1
from hsae.metrics.results import skipped_of
from hsae.rundir import write_json


def hierarchy_of_backbone(
    backbone_cfg: Any,
    dataset_cfg: Any,
    cache_cfg: Any,
    split: str,
    out_dir: str | Path,
    device: str,
) -> tuple[dict[str, float], Path]:
    """Step 1: hierarchy metrics (``hier/...``) of one backbone layer's cached activations,
    one row per image (rows of an image averaged); written to ``out_dir``."""
    from dataclasses import asdict

    from hsae.backbones import make_backbone
    from hsae.cache import CacheRequest, get_or_build
    from hsae.data import make_dataset
    from hsae.metrics.hierarchy import hierarchy_metrics

    backbone = make_backbone(backbone_cfg)
    if dataset_cfg.name == "hierarcaps":
        metrics = hierarcaps_of_backbone(
            backbone, backbone_cfg.layer, dataset_cfg, resolve_device(device)
        )
        skipped = skipped_of(metrics)
        metrics = account_for(metrics, skipped, list(HIERARCAPS_METRICS))
        path = _write_step1(out_dir, backbone_cfg, dataset_cfg, split, None, metrics, skipped)
        return metrics, path
    request = CacheRequest.from_config(backbone_cfg, cache_cfg)
    cache = get_or_build(
        cache_cfg.dir, backbone, asdict(backbone_cfg), make_dataset(dataset_cfg, split), request
    )
    feats, image_ids = image_features(cache)
    feats = feats.to(resolve_device(device))
    metrics = hierarchy_metrics(feats, cache.labels_nl[image_ids], cache.hierarchy)
    skipped = skipped_of(metrics)
    metrics = account_for(metrics, skipped, expected_step1(list(cache.hierarchy.level_names)))
    path = _write_step1(out_dir, backbone_cfg, dataset_cfg, split, cache.path, metrics, skipped)
    return metrics, path


def _write_step1(
    out_dir: str | Path, backbone_cfg: Any, dataset_cfg: Any, split: str,
    cache_path: Path | None, metrics: dict[str, float], skipped: dict[str, str],
) -> Path:  # fmt: skip
    from dataclasses import asdict

    out_path = (
        Path(out_dir)
        / f"{backbone_cfg.name}_l{backbone_cfg.layer}_{backbone_cfg.tokens}_{dataset_cfg.name}-{split}.json"
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backbone": asdict(backbone_cfg), "dataset": asdict(dataset_cfg), "split": split,
              "cache": str(cache_path) if cache_path else None, "metrics": metrics,
              "skipped": skipped}  # fmt: skip
    write_json(out_path, record)
    return out_path


@torch.no_grad()
def hierarcaps_of_backbone(
    backbone: Any, layer: int, dataset_cfg: Any, device: torch.device, batch_size: int = 64
) -> dict[str, float]:
    """Step 1 in the joint image-text space (Alper & Averbuch-Elor 2024) for a backbone with a
    text tower: radial Kendall tau of each caption chain and hierarchical retrieval, from the
    HierarCaps CSV beside ``dataset.path`` and its images (``dataset.max_images``: a seeded
    subset of chains)."""
    from PIL import Image

    from hsae.data.files import HIERARCAPS_CSV
    from hsae.metrics.hierarcaps import hierarcaps_metrics, load_hierarcaps

    if not hasattr(backbone, "encode_text"):
        raise HsaeError(
            f"dataset=hierarcaps measures the joint image-text space, but {backbone.name} has no "
            "text tower here (use an open_clip CLIP, e.g. clip_vit_b32 or tiny_vit, or a Hugging "
            "Face CLIPModel checkpoint with its text weights and tokenizer, e.g. reclip_vit_b32; "
            "the hf loader logs why it loaded only the image tower)"
        )
    image_dir = Path(dataset_cfg.path)
    data = load_hierarcaps(image_dir.parent / HIERARCAPS_CSV, image_dir)
    chosen = np.arange(len(data))
    if dataset_cfg.max_images is not None and dataset_cfg.max_images < len(data):
        rng = np.random.default_rng(dataset_cfg.seed)
        chosen = np.sort(rng.choice(len(data), size=dataset_cfg.max_images, replace=False))
    backbone.model.to(device)
    image_emb = []
    for start in range(0, len(chosen), batch_size):
        batch = [
            backbone.preprocess(Image.open(data.image_paths[i]).convert("RGB"))
            for i in chosen[start : start + batch_size]
        ]
        image_emb.append(backbone.forward_edited(torch.stack(batch).to(device), layer, None))
    caption_ids = data.caption_ids_cl[chosen]
    used = np.unique(caption_ids)
    text = torch.cat([
        backbone.encode_text([data.captions[i] for i in used[s : s + 256]])
        for s in range(0, len(used), 256)
    ])  # fmt: skip
    remap = np.full(len(data.captions), -1)
    remap[used] = np.arange(len(used))
    local_ids = remap[caption_ids]
    root = backbone.encode_text([""])[0]
    return hierarcaps_metrics(
        torch.cat(image_emb), text[torch.as_tensor(local_ids)], root, local_ids
    )
