"""The sparse TopK kernels equal dense autograd: forward values and every gradient."""

from __future__ import annotations

import pytest
import torch

from hsae.sae import TopKSAE
from hsae.sae import sparse as sparse_mod
from hsae.sae.sparse import gathered_pre_acts, sparse_decode


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


@pytest.fixture(params=[1 << 25, 200], ids=["one_chunk", "many_chunks"])
def chunk_elements(request, monkeypatch):
    monkeypatch.setattr(sparse_mod, "CHUNK_ELEMENTS", request.param)
    return request.param


def test_sparse_decode_matches_dense(chunk_elements):
    torch.manual_seed(0)
    n, k, n_latents, d = 37, 5, 64, 12
    indices = torch.stack([torch.randperm(n_latents)[:k] for _ in range(n)])
    values, table = (
        torch.randn(n, k, dtype=torch.float64),
        torch.randn(n_latents, d, dtype=torch.float64),
    )
    grad_out = torch.randn(n, d, dtype=torch.float64)

    v_s, t_s = _leaf(values), _leaf(table)
    out_s = sparse_decode(v_s, indices, t_s)
    out_s.backward(grad_out)

    v_d, t_d = _leaf(values), _leaf(table)
    codes = torch.zeros(n, n_latents, dtype=torch.float64).scatter(-1, indices, v_d)
    out_d = codes @ t_d
    out_d.backward(grad_out)

    torch.testing.assert_close(out_s, out_d)
    torch.testing.assert_close(v_s.grad, v_d.grad)
    torch.testing.assert_close(t_s.grad, t_d.grad)


def test_gathered_pre_acts_gradients_match_dense(chunk_elements):
    torch.manual_seed(1)
    n, d, n_latents, k = 29, 10, 48, 6
    x, b_pre = torch.randn(n, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    W_enc, b_enc = (
        torch.randn(d, n_latents, dtype=torch.float64),
        torch.randn(n_latents, dtype=torch.float64),
    )
    indices = torch.stack([torch.randperm(n_latents)[:k] for _ in range(n)])
    grad_out = torch.randn(n, k, dtype=torch.float64)

    sparse_leaves = [_leaf(t) for t in (x, b_pre, W_enc, b_enc)]
    with torch.no_grad():
        pre = (x - b_pre) @ W_enc + b_enc
    gathered_pre_acts(*sparse_leaves, indices, pre).backward(grad_out)

    dense_leaves = [_leaf(t) for t in (x, b_pre, W_enc, b_enc)]
    xd, bd, Wd, bed = dense_leaves
    ((xd - bd) @ Wd + bed).gather(-1, indices).backward(grad_out)

    for name, s, dense in zip(
        ("x", "b_pre", "W_enc", "b_enc"), sparse_leaves, dense_leaves, strict=True
    ):
        torch.testing.assert_close(s.grad, dense.grad, msg=f"gradient of {name}")


def _pair(**kwargs) -> tuple[TopKSAE, TopKSAE]:
    torch.manual_seed(2)
    sparse = TopKSAE(**kwargs)
    dense = TopKSAE(**kwargs)
    dense.load_state_dict(sparse.state_dict())
    dense.sparse_kernels = False
    with torch.no_grad():  # off the transposed init, so encoder and decoder differ
        for sae in (sparse, dense):
            torch.manual_seed(3)
            sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
            sae.b_enc.add_(0.1 * torch.randn_like(sae.b_enc))
            sae.b_pre.add_(0.1 * torch.randn_like(sae.b_pre))
    return sparse, dense


@pytest.mark.parametrize("with_dead", [False, True], ids=["no_auxk", "auxk"])
def test_topk_sparse_step_equals_dense_step(with_dead):
    sparse, dense = _pair(d_model=16, n_latents=96, k=4, k_aux=8, dead_tokens_threshold=50)
    if with_dead:  # a third of the latents dead: AuxK runs and trains them
        for sae in (sparse, dense):
            sae.rows_since_fired[::3] = 1000
    x = torch.randn(64, 16) * 3 + 1
    out_s, out_d = sparse(x), dense(x)
    assert (out_s.aux_loss is None) == (not with_dead)
    assert (out_d.aux_loss is None) == (not with_dead)
    out_s.loss.backward()
    out_d.loss.backward()
    torch.testing.assert_close(out_s.loss, out_d.loss)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat)
    torch.testing.assert_close(out_s.codes, out_d.codes.detach())
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p_s.grad, p_d.grad, msg=f"gradient of {name}")
    torch.testing.assert_close(sparse.rows_since_fired, dense.rows_since_fired)


def test_topk_sparse_eval_and_autocast():
    sparse, dense = _pair(d_model=16, n_latents=64, k=4)
    x = torch.randn(32, 16)
    sparse.eval(), dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).x_hat, dense(x).x_hat)
    sparse.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
    out.loss.backward()
    # float32 master weights get float32 gradients; bf16 values stay close to float32's.
    assert all(p.grad.dtype == torch.float32 for p in sparse.parameters())
    torch.testing.assert_close(out.x_hat.float(), dense(x).x_hat, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("batchtopk", {}),
        ("matryoshka", {}),
        ("matryoshka", {"activation": "topk"}),
        ("matryoshka", {"n_random_prefixes": 3}),
    ],
    ids=["batchtopk", "matryoshka", "matryoshka_topk", "matryoshka_random_prefixes"],
)
@pytest.mark.parametrize("with_dead", [False, True], ids=["no_auxk", "auxk"])
def test_batch_selections_sparse_step_equals_dense_step(arch, extra, with_dead):
    from hsae.sae import make_sae

    kwargs = dict(d_model=16, n_latents=96, k=4, k_aux=8, dead_tokens_threshold=50, **extra)
    torch.manual_seed(4)
    sparse = make_sae(arch, **kwargs)
    dense = make_sae(arch, **kwargs)
    dense.load_state_dict(sparse.state_dict())
    dense.sparse_kernels = False
    if with_dead:
        for sae in (sparse, dense):
            sae.rows_since_fired[::3] = 1000
    # Skewed rows: BatchTopK gives some rows many more latents than others (padding).
    x = torch.randn(64, 16) * torch.linspace(0.2, 4, 64)[:, None] + 1
    outs = []
    for sae in (sparse, dense):
        torch.manual_seed(5)  # the same random prefixes on both sides
        outs.append(sae(x))
        outs[-1].loss.backward()
    out_s, out_d = outs
    torch.testing.assert_close(out_s.loss, out_d.loss)
    torch.testing.assert_close(out_s.recon_loss, out_d.recon_loss)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat)
    torch.testing.assert_close(out_s.codes, out_d.codes.detach())
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p_s.grad, p_d.grad, msg=f"gradient of {name}")
    for (name, b_s), b_d in zip(sparse.named_buffers(), dense.buffers(), strict=True):
        torch.testing.assert_close(b_s, b_d, msg=f"buffer {name}")
    # Rows do take different numbers of latents: the padded selection was exercised.
    counts = (out_s.codes != 0).sum(dim=1)
    if arch == "batchtopk" or extra.get("activation", "batchtopk") == "batchtopk":
        assert counts.max() > counts.min()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("use_triton", [False, True], ids=["torch_ops", "triton"])
def test_sparse_step_on_gpu_equals_dense(use_triton, monkeypatch):
    monkeypatch.setattr(sparse_mod, "USE_TRITON", use_triton)
    sparse, dense = _pair(d_model=64, n_latents=1024, k=16, k_aux=32, dead_tokens_threshold=50)
    sparse.cuda(), dense.cuda()
    for sae in (sparse, dense):
        sae.rows_since_fired[::5] = 1000
    x = torch.randn(512, 64, device="cuda") * 2 + 1
    out_s, out_d = sparse(x), dense(x)
    out_s.loss.backward()
    out_d.loss.backward()
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-4, atol=1e-5)
    for (name, p_s), p_d in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p_s.grad, p_d.grad, rtol=1e-3, atol=1e-5, msg=name)
