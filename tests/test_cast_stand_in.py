"""The CAST stand-in: registered as a stand-in architecture and trained by the flat ViT's
recipe; a backbone like the others, whose segment trees nest."""

from __future__ import annotations

import pytest
import torch

from hsae.backbones.cast import segment_trees
from hsae.backbones.cast.superpixels import kmeans_superpixels
from hsae.backbones.stand_in import ARCHITECTURES, Recipe
from hsae.backbones.stand_in.adapter import StandInBackbone

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RECIPE = {"n_train": 256, "n_val": 128, "steps": 4, "batch_size": 32, "warmup_steps": 1}


def test_cast_is_a_stand_in_architecture_with_the_vits_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("HSAE_HOME", str(tmp_path))
    assert "cast" in ARCHITECTURES
    cast = StandInBackbone("stand_in_cast", "cast", "flat", seed=0, recipe=TINY_RECIPE)
    vit = StandInBackbone("stand_in_flat", "vit", "flat", seed=0, recipe=TINY_RECIPE)
    # One recipe for both: only the architecture differs in the store's key.
    keys = [b.train_config["key"] for b in (cast, vit)]
    assert keys[0]["recipe"] == keys[1]["recipe"] == Recipe.from_dict(TINY_RECIPE).to_dict()
    assert (keys[0]["arch"], keys[1]["arch"]) == ("cast", "vit")
    assert any(k.startswith("acc@") for k in cast.train_metrics)
    layers = cast.layers()
    assert len(layers) == 4 and layers[3].n_tokens == 1 + 4  # stage 4: 4 tokens + CLS
    images = torch.randn(5, 3, 32, 32)
    acts = cast.capture(images, [0, 3])
    assert acts[3].shape == (5, 5, 48)
    out = cast.model.encoder.forward_tree(images)
    trees = segment_trees(out)
    assert [p.shape[1] for p in trees.parents[1:]] == [16, 8, 4]


def test_kmeans_superpixels_cover_the_image_compactly():
    image = torch.zeros(2, 3, 16, 16)
    image[:, 0, :, 8:] = 3.0  # a strong colour edge down the middle
    labels = kmeans_superpixels(image, 4)
    assert labels.shape == (2, 16, 16) and labels.max() < 16
    # No superpixel straddles the edge.
    for s in labels[0].unique():
        cols = (labels[0] == s).nonzero()[:, 1]
        assert (cols < 8).all() or (cols >= 8).all()
