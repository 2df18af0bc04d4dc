"""dataset=synthetic_tree: deterministic, part masks that match the pixels, a visual tree."""

import numpy as np
import pytest
import torch

from hsae.data import make_dataset
from hsae.data.synthetic import HIERARCHY as V1_HIERARCHY
from hsae.data.synthetic import SyntheticShapes
from hsae.data.synthetic_tree import HIERARCHY, SyntheticTree
from hsae.errors import HsaeError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_deterministic_by_seed_and_split():
    a, b = SyntheticTree(16, seed=3), SyntheticTree(16, seed=3)
    torch.testing.assert_close(a.render(5), b.render(5))
    np.testing.assert_array_equal(a.masks(5)[1], b.masks(5)[1])
    assert not torch.equal(a.render(5), SyntheticTree(16, seed=4).render(5))
    assert not np.array_equal(a.labels_nl, SyntheticTree(16, seed=3, split="val").labels_nl)
    torch.testing.assert_close(a.render_all(np.array([5])), a.render(5)[None])


def test_images_labels_and_tree():
    ds = SyntheticTree(64, image_size=32)
    image, index = ds[7]
    assert image.shape == (3, 32, 32) and index == 7 and 0 <= image.min() <= image.max() <= 1
    assert HIERARCHY.level_names == ("family", "genus", "species")
    assert [HIERARCHY.n_classes(lv) for lv in range(3)] == [3, 9, 27]
    assert (ds.labels_nl == HIERARCHY.leaf_paths()[ds.leaves_n]).all()
    body, _, count = ds.traits(7)
    genus = HIERARCHY.class_names[1][ds.labels_nl[7, 1]]
    assert HIERARCHY.class_names[0][ds.labels_nl[7, 0]] == body and body in genus
    assert HIERARCHY.class_names[2][ds.labels_nl[7, 2]].startswith(f"x{count}")


def test_masks_cover_the_object_part_by_part():
    """Every pixel of the object is in the object mask with the colour of its part (body or
    part), every part is visible, and the background has neither colour."""
    ds = SyntheticTree(40, image_size=32, seed=2)
    for i in range(len(ds)):
        image = ds.render(i).numpy()
        object_mask, part_id = ds.masks(i)
        _, _, count = ds.traits(i)
        assert object_mask.dtype == bool and part_id.shape == (32, 32)
        np.testing.assert_array_equal(object_mask, part_id > 0)
        assert set(np.unique(part_id)) == set(range(count + 2)), "a part is hidden"
        body_rgb = image[:, part_id == 1].mean(axis=1)
        part_rgb = image[:, part_id >= 2].mean(axis=1)
        # Objects are bright (value >= 0.7), the background dark: a threshold finds them.
        np.testing.assert_array_equal(image.max(axis=0) > 0.62, object_mask)
        assert np.abs(image[:, part_id == 1] - body_rgb[:, None]).mean() < 0.05
        assert np.abs(image[:, part_id >= 2] - part_rgb[:, None]).mean() < 0.05


def _pose_matched_tree_correlation(ds, hierarchy, n_images: int = 8) -> tuple[float, list]:
    """Render each image's nuisance (pose, colours, background, noise) with every leaf, and
    correlate the pixel distance between two leaves' renders with their tree distance."""
    tree = hierarchy.leaf_distance()
    iu = np.triu_indices(hierarchy.n_leaves, 1)
    dist = np.zeros(len(iu[0]))
    for i in range(n_images):
        renders = []
        for leaf in range(hierarchy.n_leaves):
            ds.leaves_n[i] = leaf
            ds.labels_nl[i] = hierarchy.labels_from_leaves([leaf])[0]
            renders.append(ds.render(i).flatten().numpy())
        r = np.stack(renders)
        dist += np.sqrt(((r[:, None] - r[None]) ** 2).sum(-1))[iu]
    by_tree_distance = [dist[tree[iu] == k].mean() for k in (2, 4, 6)]
    return float(np.corrcoef(dist, tree[iu])[0, 1]), by_tree_distance


def test_tree_is_visual_and_colour_is_not_a_level():
    """With every nuisance factor held fixed, siblings differ in fewer pixels than cousins,
    and cousins fewer than other families (correlation with the tree ~0.76). In version 1,
    where the leaf level is the colour, it is the other way round (~-0.15)."""
    corr, (sibling, cousin, far) = _pose_matched_tree_correlation(
        SyntheticTree(8, 32, seed=0), HIERARCHY
    )
    assert sibling < cousin < far
    assert corr > 0.6
    corr_v1, _ = _pose_matched_tree_correlation(SyntheticShapes(8, 32, seed=0), V1_HIERARCHY)
    assert corr_v1 < 0.0
    assert corr - corr_v1 > 0.6


def test_nuisance_is_independent_of_the_class():
    """Mean object colour per family is the same up to sampling noise (colour is shared
    across the tree), while mean object area, a class trait, differs."""
    ds = SyntheticTree(900, 32, seed=1)
    fam = ds.labels_nl[:, 0]
    hue = ds.body_hsv_n3[:, 0]
    means = [np.mean(np.exp(2j * np.pi * hue[fam == f])) for f in range(3)]
    assert max(abs(m) for m in means) < 0.15  # uniform hues: the circular mean is ~0
    area = np.array([ds.masks(i)[0].sum() / ds.scale_n[i] ** 2 for i in range(300)]) / 32**2
    by_family = [area[fam[:300] == f].mean() for f in range(3)]
    assert max(by_family) - min(by_family) > 0.5


def test_make_dataset_and_bad_arguments(compose):
    from hsae.config import DatasetConfig, to_objects

    cfg = compose(["dataset=synthetic_tree", "dataset.n_val=10", "backbone=stand_in_flat"])
    ds_cfg = to_objects(cfg.dataset, DatasetConfig)
    ds = make_dataset(ds_cfg, "val")
    assert isinstance(ds, SyntheticTree) and len(ds) == 10 and ds.image_size == 32
    assert ds.describe()["name"] == "synthetic_tree"
    with pytest.raises(HsaeError, match="split"):
        SyntheticTree(4, split="holdout")
    with pytest.raises(HsaeError, match="image_size"):
        SyntheticTree(4, image_size=8)
    with pytest.raises(HsaeError, match="splits train and val"):
        make_dataset(ds_cfg, "test")
