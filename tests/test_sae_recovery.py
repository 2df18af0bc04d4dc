"""Ground-truth recovery: SAEs trained on activations built from a known sparse dictionary."""

import pytest
import torch

from hsae.errors import HsaeError
from hsae.sae import make_sae
from hsae.sae.synthetic_dictionary import (
    CHILD,
    INDEPENDENT,
    PARENT,
    fit_sae,
    make_synthetic_dictionary,
    recovery_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dictionary():
    return make_synthetic_dictionary(
        d_model=32, n_independent=64, n_parents=8, n_children=4, target_l0=4.0, seed=0
    )


def test_dictionary_is_superposed_sparse_and_hierarchical(dictionary):
    assert dictionary.n_features == 64 + 8 + 8 * 4 > 3 * dictionary.d_model
    torch.testing.assert_close(dictionary.directions_fd.norm(dim=-1), torch.ones(104))
    x, codes = dictionary.sample(20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 32)
    torch.testing.assert_close(x, codes @ dictionary.directions_fd)
    on = codes > 0
    assert on.sum(-1).float().mean() == pytest.approx(dictionary.expected_l0(), rel=0.05)
    assert dictionary.expected_l0() == pytest.approx(4.0, rel=1e-5)
    children = (dictionary.kind_f == CHILD).nonzero().flatten()
    parents = dictionary.parent_f[children]
    assert not (on[:, children] & ~on[:, parents]).any()  # a child fires only with its parent
    for parent in (dictionary.kind_f == PARENT).nonzero().flatten().tolist():
        own = children[parents == parent]
        assert on[:, own].sum(-1).max() <= 1  # one child at a time
    # Zipf-like: the most frequent top-level feature fires far more than the rarest.
    top = dictionary.probability_f[dictionary.kind_f != CHILD]
    assert top.max() > 5 * top.min()


def test_scores_are_one_for_the_true_dictionary_and_mean_max_cosine(dictionary):
    scores = recovery_scores(dictionary.directions_fd * 3.0, dictionary)
    assert scores == pytest.approx({"independent": 1.0, "parent": 1.0, "child": 1.0})
    # A merged parent+child row scores 1/sqrt(2) on both when they are orthogonal.
    p, c = torch.eye(4)[0], torch.eye(4)[1]
    toy = make_synthetic_dictionary(
        d_model=4, n_independent=0, n_parents=1, n_children=1, target_l0=0.5
    )
    toy = type(toy)(
        directions_fd=torch.stack([p, c]),
        kind_f=toy.kind_f,
        parent_f=toy.parent_f,
        probability_f=toy.probability_f,
        child_probability=toy.child_probability,
    )
    merged = recovery_scores((p + c)[None], toy)
    assert merged == pytest.approx({"parent": 2**-0.5, "child": 2**-0.5})


def test_dictionary_rejects_impossible_frequencies():
    with pytest.raises(HsaeError, match="max_probability"):
        make_synthetic_dictionary(n_independent=4, n_parents=0, target_l0=10.0)


def test_topk_at_the_true_l0_recovers_independent_features_a_random_sae_does_not(dictionary):
    torch.manual_seed(0)
    random_sae = make_sae("topk", d_model=32, n_latents=128, k=4)
    random_scores = recovery_scores(random_sae.decoder_rows(), dictionary)

    torch.manual_seed(0)
    trained = fit_sae(make_sae("topk", d_model=32, n_latents=128, k=4), dictionary, n_steps=1500)
    scores = recovery_scores(trained.decoder_rows(), dictionary)

    assert scores["independent"] >= 0.95, scores
    assert random_scores["independent"] < 0.6, random_scores
    for kind in ("independent", "parent", "child"):
        assert scores[kind] > random_scores[kind] + 0.15, (kind, scores, random_scores)
    x, _ = dictionary.sample(2048, torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert trained(x).recon_loss < 0.3 < random_sae(x).recon_loss


def test_kinds_index_the_score_names():
    assert (INDEPENDENT, PARENT, CHILD) == (0, 1, 2)
