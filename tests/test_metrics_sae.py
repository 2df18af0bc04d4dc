import math

import pytest
import torch

from hsae.errors import HsaeError
from hsae.metrics import (
    FVU,
    L0,
    L1,
    MSE,
    DeadFraction,
    DenseFraction,
    FeatureDensity,
    Shrinkage,
    make_sae_metrics,
    max_decoder_cosine,
)
from hsae.sae import make_sae


def test_fvu_is_zero_for_perfect_and_one_for_the_mean():
    x = torch.randn(100, 5) * 2 + 3
    perfect, mean = FVU(5), FVU(5)
    perfect.update(x, x, torch.zeros(100, 1))
    mean.update(x, x.mean(0).expand_as(x), torch.zeros(100, 1))
    assert perfect.compute() == pytest.approx(0.0, abs=1e-7)
    assert mean.compute() == pytest.approx(1.0, rel=1e-5)


def test_fvu_accumulates_over_batches_like_one_batch():
    # The variance is over all rows, not an average of per-batch variances.
    x, x_hat = torch.randn(60, 4) + torch.arange(60)[:, None] / 10, torch.randn(60, 4)
    one, batched = FVU(4), FVU(4)
    one.update(x, x_hat, x)
    for s in range(0, 60, 7):
        batched.update(x[s : s + 7], x_hat[s : s + 7], x)
    assert batched.compute() == pytest.approx(one.compute().item(), rel=1e-6)


def test_mse_l0_dead_fraction_known_values():
    x = torch.zeros(4, 2)
    x_hat = torch.tensor([[1.0, 0], [0, 0], [0, 2], [0, 0]])
    codes = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0]])
    mse, l0, dead = MSE(), L0(), DeadFraction(4)
    for metric in (mse, l0, dead):
        metric.update(x, x_hat, codes)
    assert mse.compute() == pytest.approx(5 / 8)
    assert l0.compute() == pytest.approx(4 / 4)
    assert dead.compute() == pytest.approx(0.5)


def test_states_merge_like_ddp_ranks():
    """Two ranks' states summed (what DDP's sync does) give the single-process value."""
    torch.manual_seed(0)
    x, x_hat = torch.randn(50, 3), torch.randn(50, 3)
    codes = torch.relu(torch.randn(50, 8)) * (torch.rand(50, 8) > 0.7)
    single = make_sae_metrics(3, 8)
    single.update(x, x_hat, codes)
    rank0, rank1 = make_sae_metrics(3, 8), make_sae_metrics(3, 8)
    rank0.update(x[:20], x_hat[:20], codes[:20])
    rank1.update(x[20:], x_hat[20:], codes[20:])
    for name, metric in rank0.items():
        metric.merge_state(rank1[name])
    expected = single.compute()
    for name, value in rank0.compute().items():
        assert value == pytest.approx(expected[name].item(), rel=1e-6), name


def test_l1_known_value():
    codes = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0]])
    l1 = L1()
    l1.update(torch.zeros(4, 2), torch.zeros(4, 2), codes)
    assert l1.compute() == pytest.approx(10 / 4)


def firing_codes() -> torch.Tensor:
    """20 rows, 4 latents firing on 2, 3, 20 and 0 rows (10%, 15%, 100%, 0%)."""
    codes = torch.zeros(20, 4)
    codes[:2, 0] = 1.0
    codes[5:8, 1] = 0.5
    codes[:, 2] = 2.0
    return codes


def test_dense_fraction_counts_latents_above_ten_percent():
    dense = DenseFraction(4)
    codes = firing_codes()
    dense.update(torch.zeros(20, 2), torch.zeros(20, 2), codes[:7])
    dense.update(torch.zeros(20, 2), torch.zeros(20, 2), codes[7:])
    # Exactly 10% is not dense; 15% and 100% are.
    assert dense.compute() == pytest.approx(2 / 4)


def test_feature_density_is_each_latents_firing_frequency():
    density = FeatureDensity(4)
    density.update(torch.zeros(20, 2), torch.zeros(20, 2), firing_codes())
    torch.testing.assert_close(density.compute(), torch.tensor([0.1, 0.15, 1.0, 0.0]))
    assert "feature_density" not in make_sae_metrics(2, 4)  # a histogram, not a scalar


def test_shrinkage_is_mean_norm_ratio_skipping_zero_rows():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]])
    x_hat = torch.tensor([[0.0, 2.5], [2.0, 0.0], [5.0, 5.0]])
    shrinkage = Shrinkage()
    shrinkage.update(x, x_hat, torch.zeros(3, 1))
    assert shrinkage.compute() == pytest.approx((0.5 + 2.0) / 2)
    perfect = Shrinkage()
    perfect.update(x[:2], x[:2], torch.zeros(2, 1))
    assert perfect.compute() == pytest.approx(1.0)


def test_max_decoder_cosine_known_value_and_chunking():
    rows = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [0.0, 0.0, 3.0]])
    # |cos| between row 0 and row 2 (and 1 and 2) is 1/sqrt(2); a row with itself does not count.
    assert max_decoder_cosine(rows) == pytest.approx(1 / math.sqrt(2))
    assert max_decoder_cosine(rows, chunk_rows=1) == pytest.approx(1 / math.sqrt(2))
    assert max_decoder_cosine(torch.eye(5)) == pytest.approx(0.0)
    with pytest.raises(HsaeError):
        max_decoder_cosine(torch.ones(1, 3))


def test_max_decoder_cosine_of_an_sae_reads_all_its_decoder_rows():
    sae = make_sae("hierarchical", d_model=4, n_latents=6, k=1, n_children=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(4)[:2])
        sae.W_cdec.copy_(torch.eye(4)[[2, 3, 2, 3]].view(2, 2, 4))  # a child row repeated
    assert max_decoder_cosine(sae) == pytest.approx(1.0)
    with torch.no_grad():
        sae.W_cdec.copy_(torch.eye(4)[[2, 3, 0, 1]].view(2, 2, 4) * -1)
    assert max_decoder_cosine(sae) == pytest.approx(1.0)  # |cosine|: opposite rows count
    topk = make_sae("topk", d_model=4, n_latents=3, k=1)
    with torch.no_grad():
        topk.W_dec.copy_(torch.tensor([[1.0, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 1, 0]]))
    assert max_decoder_cosine(topk) == pytest.approx(0.6)


def test_feature_density_states_merge_like_ddp_ranks():
    codes = firing_codes()
    single, rank0, rank1 = FeatureDensity(4), FeatureDensity(4), FeatureDensity(4)
    single.update(codes, codes, codes)
    rank0.update(codes[:9], codes[:9], codes[:9])
    rank1.update(codes[9:], codes[9:], codes[9:])
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.compute(), single.compute())
