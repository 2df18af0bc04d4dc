import numpy as np
import pytest
import torch

from hsae.data.synthetic import HIERARCHY, SyntheticShapes
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy


def test_deterministic_by_seed_and_split():
    a, b = SyntheticShapes(16, seed=3), SyntheticShapes(16, seed=3)
    torch.testing.assert_close(a.render(5), b.render(5))
    assert not torch.equal(a.render(5), SyntheticShapes(16, seed=4).render(5))
    val = SyntheticShapes(16, seed=3, split="val")
    assert not np.array_equal(a.labels_nl, val.labels_nl)


def test_images_and_labels():
    ds = SyntheticShapes(64, image_size=32)
    image, index = ds[7]
    assert image.shape == (3, 32, 32) and index == 7
    assert image.min() >= 0 and image.max() <= 1
    assert ds.labels_nl.shape == (64, 3)
    paths = HIERARCHY.leaf_paths()
    assert (ds.labels_nl == paths[ds.leaves_n]).all()


def test_hierarchy_has_three_levels_and_consistent_parents():
    assert HIERARCHY.level_names == ("family", "shape", "variant")
    assert [HIERARCHY.n_classes(lv) for lv in range(3)] == [3, 9, 27]
    assert (
        HIERARCHY.class_names[1][HIERARCHY.parents[2][HIERARCHY.class_names[2].index("red star")]]
        == "star"
    )


def test_class_signal_is_in_the_pixels():
    """The colour variant is recoverable from mean pixel colour inside the object."""
    ds = SyntheticShapes(60, seed=1)
    colour = ds.labels_nl[:, 2] % 3  # red, green, blue in order within each shape
    dominant = [int(ds.render(i).flatten(1).max(dim=1).values.argmax()) for i in range(60)]
    assert np.mean(np.array(dominant) == colour) > 0.9


def test_bad_arguments():
    with pytest.raises(HsaeError, match="split"):
        SyntheticShapes(4, split="holdout")
    with pytest.raises(HsaeError, match="n_images"):
        SyntheticShapes(0)


def test_hierarchy_lca_and_distance():
    h = Hierarchy.from_nested(("a", "b"), {"x": ["1", "2"], "y": ["3"]})
    assert h.n_leaves == 3
    np.testing.assert_array_equal(h.lca_depth(np.array([0, 0, 0]), np.array([0, 1, 2])), [2, 1, 0])
    np.testing.assert_array_equal(h.leaf_distance()[0], [0, 2, 4])
    assert Hierarchy.from_dict(h.to_dict()) == h
    with pytest.raises(HsaeError, match="bad parent"):
        Hierarchy(("a", "b"), (("x",), ("1",)), ((-1,), (5,)))
