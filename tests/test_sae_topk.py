import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsae.sae import TopKSAE, load_sae, make_sae, save_sae
from hsae.sae.base import geometric_median


def eager_topk_forward(sae: TopKSAE, x: torch.Tensor):
    """Row by row, latent by latent: the definition, written independently."""
    W_enc, b_enc, W_dec, b_pre = (p.detach() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_pre))
    codes = torch.zeros(x.shape[0], sae.n_latents)
    for i, row in enumerate(x):
        pre = [float((row - b_pre) @ W_enc[:, j] + b_enc[j]) for j in range(sae.n_latents)]
        for j in sorted(range(sae.n_latents), key=lambda j: -pre[j])[: sae.k]:
            codes[i, j] = max(pre[j], 0.0)
    x_hat = torch.stack(
        [b_pre + sum(codes[i, j] * W_dec[j] for j in range(sae.n_latents)) for i in range(len(x))]
    )
    return codes, x_hat


def test_topk_matches_eager_reference():
    torch.manual_seed(0)
    sae = TopKSAE(d_model=6, n_latents=20, k=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_pre.normal_()
    x = torch.randn(5, 6)
    codes, x_hat = eager_topk_forward(sae, x)
    out = sae(x)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, x_hat)
    assert ((out.codes != 0).sum(-1) <= 3).all()


def test_init_decoder_unit_norm_encoder_is_transpose():
    sae = TopKSAE(d_model=16, n_latents=64, k=4)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)


def test_decoder_norms_stay_one_after_optimizer_steps():
    torch.manual_seed(0)
    sae = TopKSAE(d_model=16, n_latents=64, k=4)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(20):
        out = sae(torch.randn(32, 16) * 3)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        # What is left of the gradient is orthogonal to each decoder row.
        assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
        opt.step()
        sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_loss_is_normalized_mse():
    sae = TopKSAE(d_model=8, n_latents=32, k=32)
    x = torch.randn(64, 8)
    out = sae(x)
    expected = ((out.x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.recon_loss, expected)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    d=st.integers(1, 12),
    n_latents=st.integers(1, 40),
    k_frac=st.floats(0.0, 1.0),
)
def test_shapes_and_sparsity(n, d, n_latents, k_frac):
    k = max(1, round(k_frac * n_latents))
    sae = TopKSAE(d_model=d, n_latents=n_latents, k=k)
    out = sae(torch.randn(n, d))
    assert out.x_hat.shape == (n, d)
    assert out.codes.shape == (n, n_latents)
    assert ((out.codes != 0).sum(-1) <= k).all()
    assert (out.codes >= 0).all()


def test_geometric_median_is_robust_to_outliers():
    points = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 1000.0)])
    assert geometric_median(points).norm() < 1e-3
    assert points.mean(0).norm() > 100


def test_save_load_round_trip(tmp_path):
    sae = make_sae("topk", d_model=8, n_latents=16, k=2)
    with torch.no_grad():
        sae.b_pre.normal_()
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.config() == sae.config()
    for key, value in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
