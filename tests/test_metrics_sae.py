import pytest
import torch

from hsae.metrics import FVU, L0, MSE, DeadFraction, make_sae_metrics


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
