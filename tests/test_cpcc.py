"""hsae.cpcc, the CPCC computation shared by the stand-ins and step 1, and the tree distances
it reads from the label tree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsae.cpcc import cpcc_of_classes, cpcc_pairs
from hsae.data.synthetic_tree import HIERARCHY
from hsae.errors import HsaeError
from hsae.metrics.hierarchy import cpcc


def test_class_distance_counts_edges_through_the_lowest_common_ancestor():
    for level in range(HIERARCHY.n_levels):
        paths = HIERARCHY.class_paths(level)
        dist = HIERARCHY.class_distance(level)
        for a in range(len(paths)):
            for b in range(len(paths)):
                shared = 0
                while shared <= level and paths[a, shared] == paths[b, shared]:
                    shared += 1
                assert dist[a, b] == 2 * (level + 1 - shared)
    np.testing.assert_array_equal(HIERARCHY.leaf_distance(), HIERARCHY.class_distance(-1))
    with pytest.raises(HsaeError, match="out of range"):
        HIERARCHY.class_paths(HIERARCHY.n_levels)


def test_cpcc_of_classes_high_for_tree_geometry_low_for_shuffled():
    """Leaf means placed at the leaves' path codes (one-hot per level) follow the tree; the
    same means given to shuffled leaves do not."""
    paths = torch.as_tensor(HIERARCHY.leaf_paths())
    offsets = np.cumsum([0] + [HIERARCHY.n_classes(lv) for lv in range(HIERARCHY.n_levels)])
    codes = torch.zeros(HIERARCHY.n_leaves, int(offsets[-1]))
    for level in range(HIERARCHY.n_levels):
        codes[torch.arange(HIERARCHY.n_leaves), paths[:, level] + int(offsets[level])] = 1.0
    gen = torch.Generator().manual_seed(0)
    leaves = torch.arange(20 * HIERARCHY.n_leaves) % HIERARCHY.n_leaves
    feats = codes[leaves] + 0.05 * torch.randn(len(leaves), codes.shape[1], generator=gen)
    tree = torch.as_tensor(HIERARCHY.leaf_distance())
    high = cpcc_of_classes(feats, leaves, tree)
    shuffled = torch.randperm(HIERARCHY.n_leaves, generator=gen)[leaves]
    low = cpcc_of_classes(feats, shuffled, tree)
    assert high > 0.95 and high - low > 0.5, (high, low)


def test_the_stand_ins_measure_what_step1_measures():
    """The stand-ins' held-out CPCC (leaf classes, ``cpcc_of_classes``) is step 1's
    ``hier/cpcc`` to the bit, and the training objective's smoothed pairs match its exact
    ones."""
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(300, 12, generator=gen)
    leaves = torch.arange(300) % HIERARCHY.n_leaves
    labels = HIERARCHY.labels_from_leaves(leaves.numpy())
    tree = torch.as_tensor(HIERARCHY.leaf_distance())
    assert cpcc_of_classes(feats, leaves, tree) == cpcc(feats, labels, HIERARCHY)
    t_exact, e_exact = cpcc_pairs(feats, leaves, tree)
    t_smooth, e_smooth = cpcc_pairs(feats, leaves, tree, smooth_eps=1e-8)
    torch.testing.assert_close(t_smooth.double(), t_exact)
    torch.testing.assert_close(e_smooth.double(), e_exact, atol=1e-5, rtol=1e-5)


def test_cpcc_of_classes_undefined_cases():
    tree = torch.as_tensor(HIERARCHY.leaf_distance())
    leaves = torch.arange(60) % HIERARCHY.n_leaves
    collapsed = torch.ones(60, 4)
    assert math.isnan(cpcc_of_classes(collapsed, leaves, tree))
    with pytest.raises(HsaeError, match="fewer than three classes"):
        cpcc_of_classes(torch.randn(60, 4), leaves % 2, tree)
    bad = torch.randn(60, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(HsaeError, match="NaN/Inf"):
        cpcc_of_classes(bad, leaves, tree, "stand-in CPCC")
