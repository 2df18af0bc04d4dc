"""Step 1's part-whole metrics: computed for backbones with segment trees (the CAST
stand-in), NaN with a reason for the others (a ViT stand-in), mask scores only where the
dataset has masks; the over-chance scores the CAST studies' precondition reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hsae.config import BackboneConfig, CacheConfig, DatasetConfig
from hsae.data import SyntheticTree
from hsae.evaluation import hierarchy_of_backbone
from hsae.metrics.part_whole import MASK_KEYS, PART_WHOLE_KEYS, TREE_KEYS, part_whole_scores

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RECIPE = {"n_train": 256, "n_val": 128, "steps": 4, "batch_size": 32, "warmup_steps": 1}


def _stand_in(model_name: str, name: str, layer: int) -> BackboneConfig:
    return BackboneConfig(
        name=name, loader="stand_in", model_name=model_name, pretrained="flat", init_seed=0,
        d_model=48, layer=layer, tokens="cls", recipe=dict(TINY_RECIPE),
    )  # fmt: skip


def _step1(backbone: BackboneConfig, dataset: DatasetConfig, tmp_path):
    return hierarchy_of_backbone(
        backbone, dataset, CacheConfig(dir=str(tmp_path / "cache"), device="cpu"), "val",
        tmp_path / "out", "cpu", part_whole_images=40,
    )  # fmt: skip


def test_cast_stand_in_gets_part_whole_and_the_vit_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))
    data = DatasetConfig(name="synthetic_tree", n_train=64, n_val=64)
    cast, cast_path = _step1(_stand_in("cast", "stand_in_cast", 3), data, tmp_path)
    vit, vit_path = _step1(_stand_in("vit", "stand_in_flat", 1), data, tmp_path)
    for key in PART_WHOLE_KEYS:
        assert math.isfinite(cast[key]), key
        assert key in vit and math.isnan(vit[key]), key
    assert cast["part_whole/nesting"] == 1.0  # an argmax tree nests by construction
    assert 0 < cast["part_whole/part_iou"] <= 1 and 0 < cast["part_whole/object_iou"] <= 1
    assert 0 < cast["part_whole/assignment_confidence_over_chance"] < 1
    cast_record = json.loads(cast_path.read_text())
    vit_record = json.loads(vit_path.read_text())
    assert not set(PART_WHOLE_KEYS) & set(cast_record["skipped"])
    for key in PART_WHOLE_KEYS:
        assert "segment tree" in vit_record["skipped"][key]
    # Per-image values for the study's image half-samples: one per scored image.
    per_image = cast_record["part_whole_per_image"]
    assert all(len(v) == 40 for v in per_image.values())
    assert np.mean(per_image["part_whole/part_iou"]) == pytest.approx(cast["part_whole/part_iou"])
    assert "part_whole_per_image" not in vit_record
    # The hierarchy metrics are still there for both.
    assert math.isfinite(cast["hier/cpcc"]) and math.isfinite(vit["hier/cpcc"])


def test_without_masks_only_the_tree_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))
    data = DatasetConfig(name="synthetic", n_train=64, n_val=64)  # shapes: no part masks
    cast, path = _step1(_stand_in("cast", "stand_in_cast", 3), data, tmp_path)
    skipped = json.loads(path.read_text())["skipped"]
    for key in TREE_KEYS:
        assert math.isfinite(cast[key]), key
    for key in MASK_KEYS:
        assert math.isnan(cast[key]) and "no part/object masks" in skipped[key], key


def _voronoi(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.uniform(0, size, (n, 2))
    ys, xs = np.mgrid[:size, :size]
    return ((ys[..., None] - centres[:, 0]) ** 2 + (xs[..., None] - centres[:, 1]) ** 2).argmin(-1)


def test_over_chance_scores_high_for_true_parts_near_zero_for_blind_ones():
    data = SyntheticTree(24, image_size=64, seed=0)
    rng = np.random.default_rng(0)
    masks = [data.masks(i) for i in range(len(data))]
    nested = [[p * 1000 + _voronoi(40, 64, rng), p, o.astype(np.int64)] for o, p in masks]
    blind = [[_voronoi(n, 64, rng) for n in (40, 6, 2)] for _ in masks]
    high, low = part_whole_scores(nested, masks), part_whole_scores(blind, masks)
    # Measured (24 images): part IoU over chance 0.61 vs 0.01, object 0.31 vs 0.00 (objects
    # sit near the centre: another image's object mask already overlaps this one).
    assert high["part_whole/part_iou_over_chance"] > 0.4
    assert abs(low["part_whole/part_iou_over_chance"]) < 0.1
    assert high["part_whole/object_iou_over_chance"] > 0.2
    assert abs(low["part_whole/object_iou_over_chance"]) < 0.1


def test_assignment_confidence_over_chance():
    levels = [[np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)]] * 2
    n_centres = [np.array([4, 4])]
    sure = part_whole_scores(levels, confidence=[np.ones((2, 8))], n_centres=n_centres)
    unsure = part_whole_scores(levels, confidence=[np.full((2, 8), 0.25)], n_centres=n_centres)
    assert sure["part_whole/assignment_confidence_over_chance"] == pytest.approx(0.75)
    assert unsure["part_whole/assignment_confidence_over_chance"] == pytest.approx(0.0)
    # Padding (weight 0) is not a token: the same scores with padded columns.
    padded = np.concatenate([np.ones((2, 8)), np.zeros((2, 3))], axis=1)
    assert part_whole_scores(levels, confidence=[padded], n_centres=n_centres) == sure


def test_authors_cast_superpixels_in_workers_give_the_same_scores():
    """A `loader: cast` CAST (SEEDS superpixels, computed in DataLoader workers as the cache
    builder does): the same scores as in-process, every key defined."""
    import torch

    from hsae.backbones.cast import CastBackbone
    from hsae.evaluation.step1 import part_whole_of_backbone

    data = SyntheticTree(12, image_size=64, seed=0, split="val")
    tiny = CastBackbone("cast_tiny", "cast_tiny+seeds", None, init_seed=0)
    alone, per_image = part_whole_of_backbone(tiny, data, torch.device("cpu"), 12, 4)
    workers, _ = part_whole_of_backbone(tiny, data, torch.device("cpu"), 12, 4, num_workers=2)
    assert alone == workers and not alone.skipped
    assert per_image is not None and len(per_image["part_whole/nesting"]) == 12
    assert alone["part_whole/nesting"] == 1.0
