"""Step 1: hierarchy metrics of one backbone layer (``hier/...``), or, for HierarCaps, of its
joint image-text space; plus, for backbones whose forward pass builds a segment tree (CAST,
the CAST stand-in), the intra-image part-whole metrics (``part_whole/...``; NaN with a
reason for the others). Written as one JSON record per (backbone, layer, tokens, dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae.cache import resolve_device
from hsae.errors import HsaeError
from hsae.evaluation.inputs import image_features
from hsae.evaluation.report import HIERARCAPS_METRICS, account_for, expected_step1
from hsae.metrics.part_whole import MASK_KEYS, PART_WHOLE_KEYS, output_trees, per_image_scores
from hsae.metrics.results import Metrics, skipped_of
from hsae.rundir import write_json

# Images the part-whole metrics read (the first of the split): a second forward pass, so
# fewer than step 1's; 512 gives half-samples of 256 images.
PART_WHOLE_IMAGES = 512


def hierarchy_of_backbone(
    backbone_cfg: Any,
    dataset_cfg: Any,
    cache_cfg: Any,
    split: str,
    out_dir: str | Path,
    device: str,
    part_whole_images: int = PART_WHOLE_IMAGES,
) -> tuple[dict[str, float], Path]:
    """Step 1: hierarchy metrics (``hier/...``) of one backbone layer's cached activations,
    one row per image (rows of an image averaged), and the part-whole metrics of its
    segment trees (``part_whole/...``); written to ``out_dir``."""
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
    dataset = make_dataset(dataset_cfg, split)
    cache = get_or_build(cache_cfg.dir, backbone, asdict(backbone_cfg), dataset, request)
    feats, image_ids = image_features(cache)
    feats = feats.to(resolve_device(device))
    metrics = hierarchy_metrics(feats, cache.labels_nl[image_ids], cache.hierarchy)
    part_whole, per_image = part_whole_of_backbone(
        backbone,
        dataset,
        resolve_device(device),
        part_whole_images,
        num_workers=cache_cfg.num_workers,
    )
    skipped = skipped_of(metrics) | skipped_of(part_whole)
    metrics = {**metrics, **part_whole}
    expected = expected_step1(list(cache.hierarchy.level_names)) + list(PART_WHOLE_KEYS)
    metrics = account_for(metrics, skipped, expected)
    path = _write_step1(
        out_dir, backbone_cfg, dataset_cfg, split, cache.path, metrics, skipped, per_image
    )
    return metrics, path


@torch.no_grad()
def part_whole_of_backbone(
    backbone: Any,
    dataset: Any,
    device: torch.device,
    max_images: int = PART_WHOLE_IMAGES,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[Metrics, dict[str, list[float]] | None]:
    """``part_whole/...`` of the segment trees of the first ``max_images`` images (and the
    per-image values, for image half-samples); every key NaN with a reason for a backbone
    without segment trees, the mask scores NaN for a dataset without part masks."""
    metrics = Metrics()
    forward = backbone.segment_tree_forward()
    if forward is None:
        for key in PART_WHOLE_KEYS:
            metrics.undefined(
                key,
                f"{backbone.name} builds no segment tree (only CAST and the CAST stand-in do): "
                "there is no part-whole hierarchy inside its images to measure",
            )
        return metrics, None
    from torch.utils.data import DataLoader, Subset

    has_masks = hasattr(dataset, "masks")
    dataset.transform = backbone.resize_crop  # CAST: RGB + superpixel ids
    backbone.model.to(device)
    ids, levels, confidence, n_centres = [], [], [], []
    n = min(max_images, len(dataset))
    # Superpixels (CAST's resize_crop) in worker processes, as the cache builder computes
    # them; unreadable images (ImageError) are left out.
    loader = DataLoader(
        Subset(dataset, range(n)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_readable,
    )
    for batch in loader:
        if not batch:
            continue
        images = backbone.normalize(torch.stack([image for image, _ in batch]).to(device))
        lv, conf, cent = output_trees(forward(images))
        ids += [i for _, i in batch]
        levels += lv
        confidence.append(conf)
        n_centres.append(cent)
    if not ids:
        raise HsaeError(f"part-whole metrics: none of the first {n} images could be read")
    confidence_k = [_padded_concat([c[k] for c in confidence]) for k in range(len(confidence[0]))]
    centres_k = [np.concatenate([c[k] for c in n_centres]) for k in range(len(n_centres[0]))]
    masks = [dataset.masks(i) for i in ids] if has_masks else None
    per_image = per_image_scores(levels, masks, confidence_k, centres_k)
    for key in PART_WHOLE_KEYS:
        if key in per_image:
            metrics.set_or_undefined(
                key, float(np.mean(per_image[key])), "undefined on these images (NaN)"
            )
        elif key in MASK_KEYS:
            metrics.undefined(
                key,
                f"dataset {dataset.describe().get('name', type(dataset).__name__)} has no "
                "part/object masks (dataset=synthetic_tree has)",
            )
        else:
            metrics.undefined(key, "needs at least 2 images")
    return metrics, {k: [float(x) for x in v] for k, v in per_image.items()}


def _readable(batch: list[tuple[Any, int]]) -> list[tuple[torch.Tensor, int]]:
    return [(image, i) for image, i in batch if isinstance(image, torch.Tensor)]


def _padded_concat(arrays: list[np.ndarray]) -> np.ndarray:
    width = max(a.shape[1] for a in arrays)
    return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in arrays])


def _write_step1(
    out_dir: str | Path, backbone_cfg: Any, dataset_cfg: Any, split: str,
    cache_path: Path | None, metrics: dict[str, float], skipped: dict[str, str],
    part_whole_per_image: dict[str, list[float]] | None = None,
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
    if part_whole_per_image is not None:  # the study's image half-samples read these
        record["part_whole_per_image"] = part_whole_per_image
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
