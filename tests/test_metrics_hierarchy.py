"""Step-1 hierarchy metrics: each separates a representation built to embed the label tree
from the same representation with shuffled labels, plus closed-form values where they
exist. HierarCaps metrics run on the chain structure of the real test CSV (the fixture's
32 chains; bench/hierarcaps.py runs the same separation on all 1,000)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hsae.data.synthetic import HIERARCHY
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.metrics.hierarcaps import (
    hierarcaps_metrics,
    hierarchical_retrieval,
    kendall_tau_b,
    load_hierarcaps,
    radial_kendall_tau,
)
from hsae.metrics.hierarchy import (
    clustering_ami,
    cpcc,
    fit_binary_probes,
    fit_linear_probe,
    hierarchical_distance_at_k,
    hierarchy_metrics,
    mistake_severity,
    path_consistency,
    probe_consistency,
)
from tests.conftest import HIERARCAPS_CSV, HIERARCAPS_ROWS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: extra intra-op threads only add synchronisation, which costs
    several times the compute on a loaded machine. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tree_means(hierarchy: Hierarchy, d: int, seed: int) -> torch.Tensor:
    """``[n_leaves, d]`` leaf means whose Euclidean distances are proportional to tree
    distance: one orthonormal code per class, level ``l`` scaled by ``sqrt(2 (L - l) - 1)``,
    so two leaves whose LCA is at depth ``m`` are ``sqrt(sum_{l >= m} 2 (2 (L - l) - 1))
    = sqrt(2) (L - m)`` apart."""
    n_levels = hierarchy.n_levels
    n_codes = sum(hierarchy.n_classes(lvl) for lvl in range(n_levels))
    assert d >= n_codes
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    paths = torch.as_tensor(hierarchy.leaf_paths())
    means = torch.zeros(hierarchy.n_leaves, d, dtype=torch.float64)
    first = 0
    for lvl in range(n_levels):
        codes = basis[first : first + hierarchy.n_classes(lvl)]
        means += math.sqrt(2 * (n_levels - lvl) - 1) * codes[paths[:, lvl]]
        first += hierarchy.n_classes(lvl)
    return means.float()


def make_tree_data(n: int = 1080, noise: float = 0.3, seed: int = 0):
    """Features embedding the synthetic hierarchy (3 families, 9 shapes, 27 leaves) plus
    Gaussian noise (enough for a few leaf mistakes), labels, and shuffled labels."""
    gen = torch.Generator().manual_seed(seed)
    leaves = torch.arange(n) % HIERARCHY.n_leaves  # balanced classes
    labels = torch.as_tensor(HIERARCHY.labels_from_leaves(leaves.numpy()))
    feats = tree_means(HIERARCHY, 48, seed)[leaves] + noise * torch.randn(n, 48, generator=gen)
    shuffled = labels[torch.randperm(n, generator=gen)]
    return feats, labels, shuffled


@pytest.fixture(scope="module")
def tree_data():
    return make_tree_data()


@pytest.fixture(scope="module")
def tree_and_shuffled_metrics(tree_data):
    feats, labels, shuffled = tree_data
    return (
        hierarchy_metrics(feats, labels, HIERARCHY, seed=0),
        hierarchy_metrics(feats, shuffled, HIERARCHY, seed=0),
    )


# --- CPCC --------------------------------------------------------------------------------


def test_cpcc_is_one_for_an_exact_tree_embedding_at_every_level():
    leaves = torch.arange(HIERARCHY.n_leaves).repeat(4)
    labels = HIERARCHY.labels_from_leaves(leaves.numpy())
    feats = tree_means(HIERARCHY, 48, seed=1)[leaves]
    assert cpcc(feats, labels, HIERARCHY) == pytest.approx(1.0, abs=1e-5)
    # Shape-level means are symmetric too: siblings all equally close, cousins equally far.
    assert cpcc(feats, labels, HIERARCHY, level="shape") == pytest.approx(1.0, abs=1e-5)


def test_cpcc_separates_tree_from_shuffled(tree_and_shuffled_metrics):
    tree, shuffled = tree_and_shuffled_metrics
    assert tree["hier/cpcc"] > 0.95
    assert abs(shuffled["hier/cpcc"]) < 0.3


def test_cpcc_at_the_top_level_is_undefined(tree_data):
    feats, labels, _ = tree_data
    with pytest.raises(HsaeError, match="same tree distance"):
        cpcc(feats, labels, HIERARCHY, level=0)


def test_cpcc_of_collapsed_class_means_is_nan_not_zero(tree_data):
    """Constant features: every class mean is the same point, so there is no geometry to
    correlate with the tree. Undefined is NaN with a reason, never a 0 that reads as "no
    tree structure measured"."""
    feats, labels, _ = tree_data
    assert math.isnan(cpcc(torch.ones_like(feats), labels, HIERARCHY))
    # The tree embedding still scores high: the NaN is not a failure of the metric.
    assert cpcc(feats, labels, HIERARCHY) > 0.95
    # hierarchy_metrics keeps the key, as NaN, and says why under ``skipped``.
    out = hierarchy_metrics(torch.ones_like(feats), labels, HIERARCHY)
    assert math.isnan(out["hier/cpcc"])
    assert "class means" in out.skipped["hier/cpcc"]


def test_hdist_beyond_the_leaf_count_is_nan_and_skipped(tree_data):
    """``hier/hdist@k`` for k above the number of leaves used to vanish from the output."""
    feats = tree_data[0]
    small = Hierarchy.from_nested(("coarse", "fine"), {"a": ["a1", "a2"], "b": ["b1", "b2"]})
    leaves = np.arange(len(feats)) % 4
    out = hierarchy_metrics(feats, small.labels_from_leaves(leaves), small, hdist_ks=(1, 5))
    assert out["hier/hdist@1"] >= 0
    assert math.isnan(out["hier/hdist@5"])
    assert "4 leaves" in out.skipped["hier/hdist@5"]
    assert "hier/hdist@1" not in out.skipped


# --- probes, consistency, severity --------------------------------------------------------


def test_probe_consistency_separates_tree_from_shuffled(tree_and_shuffled_metrics):
    tree, shuffled = tree_and_shuffled_metrics
    for level, n_classes in zip(HIERARCHY.level_names, (3, 9, 27), strict=True):
        assert tree[f"hier/probe_acc@{level}"] > 0.85
        # Shuffled labels: near chance (1 / n_classes), far below the tree's accuracy.
        assert shuffled[f"hier/probe_acc@{level}"] < 1.0 / n_classes + 0.15
    assert tree["hier/full_path_acc"] > 0.8 > 0.1 > shuffled["hier/full_path_acc"]
    assert tree["hier/consistency"] > 0.9
    assert shuffled["hier/consistency"] < 0.6
    assert tree["hier/consistency"] - shuffled["hier/consistency"] > 0.4


def test_mistake_severity_and_hdist_separate_tree_from_shuffled(tree_and_shuffled_metrics):
    tree, shuffled = tree_and_shuffled_metrics
    # Tree: the few mistakes are mostly siblings (height 1); shuffled: random leaves, whose
    # expected LCA height is (2*1 + 6*2 + 18*3) / 26 = 2.62.
    assert tree["hier/mistake_severity"] < 1.8
    assert shuffled["hier/mistake_severity"] > 2.4
    assert tree["hier/hdist@1"] < 0.3 < 2.0 < shuffled["hier/hdist@1"]
    # Top-5 of an exact tree embedding: the truth and its siblings/cousins come first.
    assert tree["hier/hdist@5"] < shuffled["hier/hdist@5"] - 0.6


def test_mistake_severity_known_values():
    # Leaves 0, 1 are siblings (same shape), 3 shares only the family, 9 only the root.
    true = np.array([0, 0, 0, 5])
    assert mistake_severity(np.array([1, 3, 9, 5]), true, HIERARCHY) == pytest.approx(2.0)
    assert mistake_severity(np.array([1]), np.array([0]), HIERARCHY) == 1.0
    assert math.isnan(mistake_severity(true, true, HIERARCHY))


def test_hdist_at_k_known_values():
    scores = torch.zeros(1, HIERARCHY.n_leaves)
    scores[0, 0], scores[0, 1], scores[0, 9] = 3.0, 2.0, 1.0  # truth, sibling, other family
    true = torch.tensor([0])
    assert hierarchical_distance_at_k(scores, true, HIERARCHY, 1) == 0.0
    assert hierarchical_distance_at_k(scores, true, HIERARCHY, 2) == pytest.approx(0.5)
    assert hierarchical_distance_at_k(scores, true, HIERARCHY, 3) == pytest.approx(4 / 3)


def test_probe_consistency_is_deterministic_by_seed(tree_data):
    feats, labels, _ = tree_data
    a = probe_consistency(feats[:540], labels[:540], HIERARCHY, seed=3)
    b = probe_consistency(feats[:540], labels[:540], HIERARCHY, seed=3)
    assert a.acc_l == b.acc_l
    torch.testing.assert_close(a.leaf_logits_nc, b.leaf_logits_nc)


def test_path_consistency_known_values():
    # Leaf 4 is (family 0, shape 1); leaf 13 is (family 1, shape 4).
    pred = torch.tensor([[0, 1, 4], [1, 4, 13], [1, 1, 4], [0, 1, 13]])
    assert path_consistency(pred, HIERARCHY) == pytest.approx(0.5)
    with pytest.raises(HsaeError, match="one per level"):
        path_consistency(pred[:, :2], HIERARCHY)


# --- clustering ---------------------------------------------------------------------------


def test_clustering_ami_separates_tree_from_shuffled(tree_and_shuffled_metrics):
    tree, shuffled = tree_and_shuffled_metrics
    for level in HIERARCHY.level_names:
        assert tree[f"hier/ami@{level}"] > 0.8
        assert abs(shuffled[f"hier/ami@{level}"]) < 0.05


def test_clustering_ami_subsamples(tree_data):
    feats, labels, _ = tree_data
    amis = clustering_ami(feats, labels, HIERARCHY, max_points=300, seed=1)
    assert len(amis) == 3 and min(amis) > 0.8


# --- names, shared probe trainer, bad inputs ----------------------------------------------


def test_hierarchy_metrics_names(tree_and_shuffled_metrics):
    tree, _ = tree_and_shuffled_metrics
    levels = HIERARCHY.level_names
    expected = {"hier/cpcc", "hier/full_path_acc", "hier/consistency", "hier/mistake_severity"}
    expected |= {f"hier/probe_acc@{lv}" for lv in levels} | {f"hier/ami@{lv}" for lv in levels}
    expected |= {"hier/hdist@1", "hier/hdist@5"}
    assert set(tree) == expected
    assert all(isinstance(v, float) for v in tree.values())


def test_probes_match_scikit_learn_reference():
    """The torch trainers solve the same objectives as scikit-learn's L-BFGS logistic
    regression (L2 on weights, none on the intercept) on standardised features."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=gen)
    score = 2 * x[:, 0] + x[:, 1] + 0.5 * torch.randn(300, generator=gen)
    y = score.round().clamp(-1, 1).long() + 1
    wd = 1e-2
    probe = fit_linear_probe(x, y, 3, weight_decay=wd)
    xs = ((x - probe.mean_d) / probe.scale_d).numpy()
    ref = LogisticRegression(C=1 / (wd * 300), tol=1e-10, max_iter=10_000).fit(xs, y.numpy())
    weight = probe.weight_do.T.numpy()
    # Softmax logits are defined up to a shared shift: compare centred parameters.
    np.testing.assert_allclose(weight - weight.mean(0), ref.coef_ - ref.coef_.mean(0), atol=2e-3)
    yb = (score > 1.0)[None]
    coef, icpt, standard = fit_binary_probes(x[None], yb, weight_decay=wd)
    ref_b = LogisticRegression(
        C=1 / (wd * 300), class_weight="balanced", tol=1e-12, max_iter=10_000
    )
    ref_b.fit(((x - standard[0]) / standard[1]).numpy(), yb[0].numpy())
    np.testing.assert_allclose(coef[0].numpy(), ref_b.coef_[0], atol=1e-4)
    np.testing.assert_allclose(icpt.numpy(), ref_b.intercept_, atol=1e-4)


def test_batched_binary_probes_match_separate_fits():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, 2, generator=gen)
    y = (x[..., 0] + 0.5 * x[..., 1] + 0.3 * torch.randn(3, 400, generator=gen)) > 0.5
    coef, icpt, _ = fit_binary_probes(x, y)
    for p in range(3):
        c1, i1, _ = fit_binary_probes(x[p : p + 1], y[p : p + 1])
        torch.testing.assert_close(coef[p], c1[0])
        torch.testing.assert_close(icpt[p], i1[0])
    assert (coef[:, 0] > 0).all() and (coef[:, 0] > coef[:, 1]).all()


def test_bad_inputs_raise_helpful_errors(tree_data):
    feats, labels, _ = tree_data
    with pytest.raises(HsaeError, match="rows"):
        hierarchy_metrics(feats[:-1], labels, HIERARCHY)
    bad = feats.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(HsaeError, match="NaN"):
        cpcc(bad, labels, HIERARCHY)
    with pytest.raises(HsaeError, match=r"\[n, 3\]"):
        cpcc(feats, labels[:, :2], HIERARCHY)
    wrong_parent = labels.clone()
    wrong_parent[0, 0] = (wrong_parent[0, 0] + 1) % 3
    with pytest.raises(HsaeError, match="parents"):
        probe_consistency(feats, wrong_parent, HIERARCHY)
    one_family = Hierarchy.from_nested(("family", "leaf"), {"only": ["a", "b"]})
    labels2 = one_family.labels_from_leaves(np.arange(40) % 2)
    with pytest.raises(HsaeError, match="only 1 class"):
        probe_consistency(torch.randn(40, 4), labels2, one_family)
    with pytest.raises(HsaeError, match="only one class"):
        clustering_ami(torch.randn(40, 4), labels2, one_family)


# --- HierarCaps -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hierarcaps():
    return load_hierarcaps(HIERARCAPS_CSV)


def test_load_hierarcaps_real_csv(hierarcaps):
    hc = hierarcaps
    assert len(hc) == HIERARCAPS_ROWS and hc.n_levels == 4
    assert hc.chains[1][0] == "bird" and hc.chains[1][1] == "blue bird"
    assert hc.image_paths[0].name == "COCO_val2014_000000301718.jpg"
    assert all(p.is_file() for p in hc.image_paths)
    # Identical strings share one id; distinct strings never do.
    flat = [c for chain in hc.chains for c in chain]
    ids = hc.caption_ids_cl.reshape(-1)
    assert [hc.captions[i] for i in ids] == flat
    assert len(hc.captions) == len(set(flat)) < len(flat)


def test_load_hierarcaps_rejects_bad_files(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"")
    bad_col = tmp_path / "bad_col.csv"
    bad_col.write_text("id,caption,image_url\n0,a => b,http://x/a.jpg\n")
    with pytest.raises(HsaeError, match="lacks column"):
        load_hierarcaps(bad_col)
    uneven = tmp_path / "uneven.csv"
    uneven.write_text(
        "id,captions,image_url\n0,a => b,http://x/a.jpg\n1,a => b => c,http://x/a.jpg\n"
    )
    with pytest.raises(HsaeError, match="same depth"):
        load_hierarcaps(uneven)
    missing = tmp_path / "missing.csv"
    missing.write_text("id,captions,image_url\n0,a => b,http://x/a.jpg\n1,a => c,http://x/b.jpg\n")
    with pytest.raises(HsaeError, match="1 of 2 HierarCaps images are missing"):
        load_hierarcaps(missing)
    assert len(load_hierarcaps(missing, check_images=False)) == 2
    with pytest.raises(HsaeError, match="no HierarCaps CSV"):
        load_hierarcaps(tmp_path / "absent.csv")


def radial_embedding(caption_ids_cl: np.ndarray, e: int = 128, seed: int = 0):
    """A radial embedding of the real chains: every distinct caption gets a random direction
    ``u`` orthogonal to the root ``r`` and sits at ``r + s u``, ``s`` growing with the
    (shallowest) level the caption appears at, so specific captions lie farther from the
    root; each image is ``r + sum_j s_j u_j`` over its chain, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(caption_ids_cl)
    n_captions = int(ids.max()) + 1
    level = torch.full((n_captions,), ids.shape[1])
    for j in range(ids.shape[1]):
        level[ids[:, j]] = torch.minimum(level[ids[:, j]], torch.tensor(j))
    root = F.normalize(torch.randn(e, generator=gen), dim=0)
    u = torch.randn(n_captions, e, generator=gen)
    u = F.normalize(u - (u @ root)[:, None] * root, dim=1)
    s = 0.5 * (level + 1).float() + 0.3 * torch.rand(n_captions, generator=gen)
    captions = root + s[:, None] * u
    images = (
        root + (s[ids][..., None] * u[ids]).sum(1) + 0.1 * torch.randn(len(ids), e, generator=gen)
    )
    return images, captions[ids], root


def test_hierarcaps_metrics_separate_radial_from_random(hierarcaps):
    ids = hierarcaps.caption_ids_cl
    images, texts, root = radial_embedding(ids)
    high = hierarcaps_metrics(images, texts, root, ids)
    # Random embeddings, averaged over 20 draws: on 32 chains one draw's tau spreads by
    # +-0.09 around 0 (on 1,000 chains by +-0.02), the mean of 20 by +-0.02.
    gen = torch.Generator().manual_seed(1)
    draws = [
        hierarcaps_metrics(
            torch.randn(images.shape, generator=gen),
            torch.randn(texts.shape, generator=gen),
            torch.randn(root.shape, generator=gen),
            ids,
        )
        for _ in range(20)
    ]
    low = {key: float(np.mean([d[key] for d in draws])) for key in high}
    # Captions seen at several levels (e.g. "skier") keep one radius, so a few chains tie.
    assert high["hier/kendall_tau"] > 0.9
    assert abs(low["hier/kendall_tau"]) < 0.1
    assert high["hier/retrieval_recall"] > 0.6 > 0.05 > low["hier/retrieval_recall"]
    assert high["hier/retrieval_precision"] > 0.4 > 0.05 > low["hier/retrieval_precision"]


def test_retrieval_walks_outward_along_the_chain(hierarcaps):
    ids = hierarcaps.caption_ids_cl
    images, texts, root = radial_embedding(ids)
    res = hierarchical_retrieval(images, texts, root, ids, n_thresholds=20)
    # At the largest radius every caption is allowed: each image finds its own chain.
    assert res.precision_t[-1] > 0.95
    assert (res.thresholds_t.diff() >= 0).all()


def test_kendall_tau_known_values():
    order = torch.arange(4.0).expand(3, -1)
    x = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.3, 0.2, 0.4]])
    torch.testing.assert_close(
        kendall_tau_b(x, order), torch.tensor([1.0, -1.0, 4 / 6], dtype=torch.float64)
    )
    # Radial: distances from the root along each chain, reversed for the second chain.
    root = torch.tensor([1.0, 0.0])
    angles = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    texts = torch.stack([angles.cos(), angles.sin()], dim=-1)
    assert radial_kendall_tau(texts, root) == pytest.approx(0.0)
    assert radial_kendall_tau(texts[:1], root) == pytest.approx(1.0)


def test_hierarcaps_metrics_reject_bad_shapes():
    with pytest.raises(HsaeError, match="root embedding"):
        radial_kendall_tau(torch.randn(5, 4, 8), torch.randn(7))
    with pytest.raises(HsaeError, match="image embeddings"):
        hierarchical_retrieval(torch.randn(4, 8), torch.randn(5, 4, 8), torch.randn(8))
    texts = torch.randn(5, 4, 8)
    texts[0, 0, 0] = float("nan")
    with pytest.raises(HsaeError, match="NaN"):
        radial_kendall_tau(texts, torch.randn(8))
