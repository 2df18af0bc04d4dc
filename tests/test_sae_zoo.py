"""Every SAE architecture against an eager reference written here, loop by loop, from the
papers' definitions; plus shapes, round trips, training and each architecture's own rules."""

import math
import re
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.sae import (
    SAE_REGISTRY,
    BatchTopKSAE,
    GatedSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    TopKSAE,
    load_sae,
    make_sae,
    sae_kwargs,
    save_sae,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and on a shared machine several threads per
    process spend their time waiting for each other (5x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


D, L, N = 5, 12, 6

# One small instance of each architecture, with non-default hyperparameters where they
# change the maths.
ZOO = {
    "relu": dict(l1_coeff=0.7, l1_warmup_fraction=0.5),
    "topk": dict(k=3, k_aux=2, dead_tokens_threshold=50),
    "batchtopk": dict(k=3, threshold_momentum=0.25),
    "jumprelu": dict(bandwidth=0.3, sparsity_coeff=0.05, init_threshold=0.2),
    "gated": dict(l1_coeff=0.4),
    "matryoshka": dict(k=3, group_fractions=[0.25, 0.25, 0.5], activation="topk"),
    "hierarchical": dict(k=2, n_children=2, k_child=1, parent_recon_coeff=0.5),
}


def make(arch: str, d: int = D, n_latents: int = L, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    sae = make_sae(arch, d_model=d, n_latents=n_latents, **(ZOO[arch] | overrides)).double()
    with torch.no_grad():  # biases off zero, so the reference checks them too
        for name, param in sae.named_parameters():
            if name.startswith("b_"):
                param.normal_(std=0.3)
    return sae


def data(n: int = N, d: int = D, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5


# ---- eager reference: lists and loops only ------------------------------------------------


def rows(t: torch.Tensor) -> list:
    return t.detach().double().tolist()


def eager_pre(x, W, b, b_pre):
    """``W`` is ``[d, m]``: pre[i][j] = sum_c (x[i][c] - b_pre[c]) W[c][j] + b[j]."""
    d, m = len(W), len(W[0])
    return [
        [sum((xi[c] - b_pre[c]) * W[c][j] for c in range(d)) + b[j] for j in range(m)] for xi in x
    ]


def eager_decode(codes, W_dec, bias):
    d = len(W_dec[0])
    return [
        [bias[c] + sum(f[j] * W_dec[j][c] for j in range(len(f))) for c in range(d)] for f in codes
    ]


def eager_nmse(x_hat, x):
    n, d = len(x), len(x[0])
    mean = [sum(x[i][c] for i in range(n)) / n for c in range(d)]
    var = sum((x[i][c] - mean[c]) ** 2 for i in range(n) for c in range(d)) / n
    err = sum((x_hat[i][c] - x[i][c]) ** 2 for i in range(n) for c in range(d)) / n
    return err / max(var, 1e-12)


def eager_topk_row(pre_row, k):
    keep = sorted(range(len(pre_row)), key=lambda j: -pre_row[j])[:k]
    return [max(pre_row[j], 0.0) if j in keep else 0.0 for j in range(len(pre_row))]


def eager_batch_topk(pre, k):
    flat = [(max(v, 0.0), i, j) for i, row in enumerate(pre) for j, v in enumerate(row)]
    keep = {(i, j) for _, i, j in sorted(flat, key=lambda t: -t[0])[: k * len(pre)]}
    return [
        [max(v, 0.0) if (i, j) in keep else 0.0 for j, v in enumerate(row)]
        for i, row in enumerate(pre)
    ]


def eager_batch_variance(x):
    n, d = len(x), len(x[0])
    mean = [sum(x[i][c] for i in range(n)) / n for c in range(d)]
    return sum((x[i][c] - mean[c]) ** 2 for i in range(n) for c in range(d)) / n


def close(actual, expected):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-10,
    )


# ---- reference equivalence ----------------------------------------------------------------


def test_relu_matches_reference_with_decoder_norm_weighted_l1_and_warmup():
    sae, x = make("relu"), data()
    with torch.no_grad():  # decoder rows of unequal norms: the L1 must weight by them
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, L, dtype=torch.float64)[:, None])
    sae.set_progress(step=10, total_steps=100)  # warm-up of 50 steps: 20% of the coefficient
    X, W_dec = rows(x), rows(sae.W_dec)
    pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre))
    codes = [[max(v, 0.0) for v in r] for r in pre]
    x_hat = eager_decode(codes, W_dec, rows(sae.b_pre))
    norms = [math.sqrt(sum(w * w for w in row)) for row in W_dec]
    l1 = sum(sum(f[j] * norms[j] for j in range(L)) for f in codes) / N
    sparsity = 0.7 * 0.2 * l1 / math.sqrt(D * eager_batch_variance(X))
    out = sae(x)
    close(out.codes, codes)
    close(out.x_hat, x_hat)
    close(out.recon_loss, eager_nmse(x_hat, X))
    close(out.sparsity_loss, sparsity)
    close(out.loss, eager_nmse(x_hat, X) + sparsity)


def test_relu_l1_warmup_ramps_from_zero():
    sae, x = make("relu"), data()
    sae.set_progress(0, 100)
    assert sae(x).sparsity_loss.item() == 0
    sae.set_progress(25, 100)
    half = sae(x).sparsity_loss
    sae.set_progress(80, 100)
    close(sae(x).sparsity_loss, 2 * half)


def test_relu_has_no_unit_norm_constraint():
    sae = make("relu")
    assert not hasattr(sae, "normalize_decoder")
    assert not hasattr(sae, "remove_parallel_grad")
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)  # encoder starts as the transpose
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((L,), 0.1, dtype=torch.float64))


def test_topk_matches_reference_and_loss_is_recon_when_nothing_is_dead():
    sae, x = make("topk"), data()
    X = rows(x)
    pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre))
    codes = [eager_topk_row(r, 3) for r in pre]
    x_hat = eager_decode(codes, rows(sae.W_dec), rows(sae.b_pre))
    out = sae(x)
    close(out.codes, codes)
    close(out.x_hat, x_hat)
    assert out.aux_loss is None
    assert torch.equal(out.loss, out.recon_loss)
    close(out.loss, eager_nmse(x_hat, X))


def test_topk_auxk_matches_reference_and_tracks_rows_since_fired():
    sae, x = make("topk"), data()
    X = rows(x)
    pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre))
    codes = [eager_topk_row(r, 3) for r in pre]
    fired = {j for f in codes for j in range(L) if f[j] != 0}
    dead = [j for j in range(L) if j not in fired][:4]  # dead latents that stay silent
    start = [0] * L
    for j in dead:
        start[j] = 50  # the threshold
    start[next(iter(fired))] = 50  # dead before this batch, but it fires now
    dead_before = [j for j in range(L) if start[j] >= 50]
    with torch.no_grad():
        sae.rows_since_fired.copy_(torch.tensor(start))
    x_hat = eager_decode(codes, rows(sae.W_dec), rows(sae.b_pre))
    residual = [[X[i][c] - x_hat[i][c] for c in range(D)] for i in range(N)]
    aux_codes = []
    for r in pre:
        top = sorted(dead_before, key=lambda j: -r[j])[:2]  # k_aux = 2
        aux_codes.append([max(r[j], 0.0) if j in top else 0.0 for j in range(L)])
    e_hat = eager_decode(aux_codes, rows(sae.W_dec), [0.0] * D)
    aux = eager_nmse(e_hat, residual) / 32
    out = sae.train()(x)
    close(out.aux_loss, aux)
    close(out.loss, eager_nmse(x_hat, X) + aux)
    expected = [0 if j in fired else start[j] + N for j in range(L)]
    assert sae.rows_since_fired.tolist() == expected
    # Eval never counts rows nor adds AuxK.
    out_eval = sae.eval()(x)
    assert out_eval.aux_loss is None
    assert sae.rows_since_fired.tolist() == expected


def test_without_a_window_no_latent_is_dead_and_the_config_resolves_one():
    sae = make("topk", dead_tokens_threshold=None)
    with torch.no_grad():
        sae.rows_since_fired.fill_(10**9)
    assert not sae.dead_latents().any()
    out = sae.train()(data())
    assert out.aux_loss is None
    # The run's window: a fraction of an epoch, or the absolute number when given.
    cfg = SAEConfig(n_latents=16)
    assert cfg.dead_tokens_threshold is None
    assert cfg.dead_rows(16_384) == round(cfg.dead_epoch_fraction * 16_384) <= 16_384
    assert SAEConfig(n_latents=16, dead_epoch_fraction=0.25).dead_rows(1000) == 250
    assert SAEConfig(n_latents=16, dead_tokens_threshold=77).dead_rows(16_384) == 77
    with pytest.raises(HsaeError, match="dead_epoch_fraction"):
        SAEConfig(n_latents=16, dead_epoch_fraction=0.0)


def test_auxk_trains_only_dead_latents():
    sae, x = make("topk"), data()
    dead = torch.zeros(L, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.rows_since_fired[dead] = 10**6
    out = sae.train()(x)
    out.aux_loss.backward()
    # The residual is a target: live latents' weights get nothing from AuxK.
    assert (sae.W_dec.grad[~dead] == 0).all() and (sae.W_enc.grad[:, ~dead] == 0).all()
    assert sae.W_dec.grad[dead].abs().sum() > 0


def test_batchtopk_matches_reference_and_estimates_threshold():
    sae, x = make("batchtopk"), data()
    X = rows(x)
    pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre))
    codes = eager_batch_topk(pre, 3)
    out = sae.train()(x)
    close(out.codes, codes)
    close(out.x_hat, eager_decode(codes, rows(sae.W_dec), rows(sae.b_pre)))
    close(out.loss, eager_nmse(eager_decode(codes, rows(sae.W_dec), rows(sae.b_pre)), X))
    first = min(v for r in codes for v in r if v > 0)
    close(sae.threshold, first)
    x2 = data(seed=2)
    codes2 = eager_batch_topk(
        eager_pre(rows(x2), rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre)), 3
    )
    second = min(v for r in codes2 for v in r if v > 0)
    sae(x2)
    close(sae.threshold, 0.75 * first + 0.25 * second)  # momentum 0.25


def test_batchtopk_shares_the_budget_across_rows():
    sae, x = make("batchtopk", n_latents=40), data(n=16)
    counts = (sae.train()(x).codes != 0).sum(dim=-1)
    assert counts.sum() <= 3 * 16
    assert counts.max() > 3 or counts.min() < 3  # rows differ; TopK would give exactly 3 each


def test_batchtopk_uses_its_threshold_in_eval_mode():
    sae, x = make("batchtopk"), data(n=32)
    sae.train()(x)  # one step estimates the threshold
    theta = float(sae.threshold)
    sae.eval()
    pre = rows(sae.pre_acts(x))
    expected = [[v if v > theta else 0.0 for v in r] for r in pre]
    close(sae(x).codes, expected)
    close(sae.encode(x), expected)
    # A row's codes no longer depend on the rest of its batch.
    close(sae(x[:1]).codes, expected[:1])
    assert not torch.equal(sae(x).codes, torch.as_tensor(eager_batch_topk(pre, 3)))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_calibrated_threshold_gives_eval_l0_of_k_where_the_running_average_does_not(arch):
    extra = dict(group_fractions=[0.25, 0.25, 0.5], activation="batchtopk")
    sae = make(arch, n_latents=40, **(extra if arch == "matryoshka" else {}))
    x = data(n=64, seed=5)
    sae.train()(x * 4)  # the running average starts on rows four times larger
    sae.eval()
    before = float((sae.encode(x) != 0).sum(dim=-1).double().mean())
    with torch.inference_mode():  # where Lightning calls it (validation)
        theta = sae.calibrate_threshold(x, max_elements=200)  # 5 rows per chunk
    l0 = (sae.encode(x) != 0).sum(dim=-1).double()
    assert l0.mean() == 3  # exactly k on the calibration rows
    assert abs(before - 3) > 1, before  # the running average alone: far off
    pre = rows(sae.pre_acts(x / sae.input_scale))
    positive = sorted((v for r in pre for v in r if v > 0), reverse=True)
    close(theta, (positive[3 * 64 - 1] + positive[3 * 64]) / 2)
    close(sae.threshold, theta)


def test_calibration_with_too_few_positive_pre_activations_fires_them_all():
    sae, x = make("batchtopk", n_latents=40), data(n=8)
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)  # nearly nothing positive
        sae.b_enc[0] = 50.0
    assert sae.calibrate_threshold(x) == 0.0
    assert (sae.eval().encode(x) != 0).sum() == (sae.pre_acts(x) > 0).sum()


def test_non_threshold_archs_calibrate_nothing():
    for arch in ("topk", "relu", "jumprelu", "gated", "hierarchical"):
        sae = make(arch)
        before = {k: v.clone() for k, v in sae.state_dict().items()}
        sae.calibrate(data(n=8))
        assert all(torch.equal(v, sae.state_dict()[k]) for k, v in before.items()), arch
        assert not sae.needs_calibration()
    sae = make("matryoshka")  # its TopK inside has no threshold
    sae.calibrate(data(n=8))
    assert not hasattr(sae, "threshold") and not sae.needs_calibration()
    assert make("batchtopk").needs_calibration()
    assert make("matryoshka", activation="batchtopk").needs_calibration()


def test_batchtopk_without_threshold_falls_back_to_batch_topk():
    sae, x = make("batchtopk"), data()
    pre = eager_pre(rows(x), rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre))
    close(sae.eval()(x).codes, eager_batch_topk(pre, 3))
    assert sae.n_threshold_updates.item() == 0


def eager_jumprelu(sae, X):
    theta = [math.exp(t) for t in rows(sae.log_threshold)]
    pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), rows(sae.b_pre))
    codes = [[v if v > theta[j] else 0.0 for j, v in enumerate(r)] for r in pre]
    l0 = sum(sum(1 for j, v in enumerate(r) if v > theta[j]) for r in pre) / len(X)
    return pre, theta, codes, l0


def test_jumprelu_matches_reference():
    sae, x = make("jumprelu"), data()
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-3, 1, L, dtype=torch.float64))
    sae.set_progress(5, 100)  # warm-up of 10 steps: half the coefficient
    X = rows(x)
    _, _, codes, l0 = eager_jumprelu(sae, X)
    x_hat = eager_decode(codes, rows(sae.W_dec), rows(sae.b_pre))
    out = sae(x)
    close(out.codes, codes)
    close(out.x_hat, x_hat)
    close(out.sparsity_loss, 0.05 * 0.5 * l0)
    close(out.loss, eager_nmse(x_hat, X) + 0.05 * 0.5 * l0)


def test_jumprelu_threshold_gradient_is_the_rectangle_kernel_estimate():
    sae, x = make("jumprelu", bandwidth=1.0, sparsity_coeff=1.0), data(n=64)
    X = rows(x)
    pre, theta, _, _ = eager_jumprelu(sae, X)
    eps = 1.0
    out = sae(x)
    out.sparsity_loss.backward()
    # d/dtheta H(z - theta) := -(1/eps) K((z - theta)/eps); d/dlog(theta) = theta d/dtheta.
    expected = [
        theta[j] * sum(-(1 / eps) for r in pre if abs((r[j] - theta[j]) / eps) < 0.5) / len(X)
        for j in range(L)
    ]
    close(sae.log_threshold.grad, expected)
    assert sae.W_enc.grad is None or sae.W_enc.grad.abs().max() == 0  # no gradient to z from L0


def test_jumprelu_threshold_gradient_is_zero_outside_the_bandwidth_window():
    sae, x = make("jumprelu", bandwidth=0.4, sparsity_coeff=0.1, init_threshold=0.6), data(n=8)
    pre = sae.pre_acts(x).detach()
    in_window = ((pre - sae.threshold.detach()).abs() < 0.2).any(dim=0)
    assert 0 < in_window.sum() < L, "the test needs latents on both sides of the window"
    sae(x).loss.backward()
    grad = sae.log_threshold.grad
    assert (grad[~in_window] == 0).all()
    assert (grad[in_window] != 0).all()


def test_gated_matches_reference():
    sae, x = make("gated"), data()
    with torch.no_grad():
        sae.r_mag.normal_(std=0.5)
    X, b_pre = rows(x), rows(sae.b_pre)
    pi_gate = eager_pre(X, rows(sae.W_gate), rows(sae.b_gate), b_pre)
    r_mag = rows(sae.r_mag)
    W_mag = [[w * math.exp(r_mag[j]) for j, w in enumerate(row)] for row in rows(sae.W_gate)]
    pi_mag = eager_pre(X, W_mag, rows(sae.b_mag), b_pre)
    codes = [
        [(1.0 if g[j] > 0 else 0.0) * max(m[j], 0.0) for j in range(L)]
        for g, m in zip(pi_gate, pi_mag, strict=True)
    ]
    x_hat = eager_decode(codes, rows(sae.W_dec), b_pre)
    gate_acts = [[max(v, 0.0) for v in r] for r in pi_gate]
    aux = eager_nmse(eager_decode(gate_acts, rows(sae.W_dec), b_pre), X)
    sparsity = 0.4 * sum(sum(r) for r in gate_acts) / N / math.sqrt(D * eager_batch_variance(X))
    out = sae(x)
    close(out.codes, codes)
    close(out.x_hat, x_hat)
    close(out.aux_loss, aux)
    close(out.sparsity_loss, sparsity)
    close(out.loss, eager_nmse(x_hat, X) + aux + sparsity)


def test_gated_auxiliary_loss_leaves_the_decoder_frozen_and_l1_spares_magnitudes():
    sae, x = make("gated"), data()
    out = sae(x)
    out.aux_loss.backward(retain_graph=True)
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().max() == 0
    assert sae.W_gate.grad.abs().sum() > 0
    sae.zero_grad()
    out.sparsity_loss.backward()
    for name in ("r_mag", "b_mag", "W_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or grad.abs().max() == 0, name


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_matryoshka_matches_reference_prefix_by_prefix(activation):
    sae, x = make("matryoshka", activation=activation), data()
    X, W_dec, b_pre = rows(x), rows(sae.W_dec), rows(sae.b_pre)
    pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), b_pre)
    codes = (
        [eager_topk_row(r, 3) for r in pre] if activation == "topk" else eager_batch_topk(pre, 3)
    )
    ends = [3, 6, 12]  # group_fractions 0.25, 0.25, 0.5 of 12 latents
    assert sae.prefix_ends() == ends
    prefixes = [eager_decode([f[:end] for f in codes], W_dec[:end], b_pre) for end in ends]
    for recon, expected in zip(
        sae.reconstruct_prefixes(sae.encode(x), ends), prefixes, strict=True
    ):
        close(recon, expected)
    out = sae(x)
    close(out.codes, codes)
    close(out.x_hat, prefixes[-1])
    close(out.recon_loss, eager_nmse(prefixes[-1], X))
    close(out.loss, sum(eager_nmse(p, X) for p in prefixes) / 3)


def test_matryoshka_random_prefixes_in_training_fixed_groups_in_eval():
    sae = make("matryoshka", n_latents=64, n_random_prefixes=4)
    for _ in range(20):
        ends = sae.train().prefix_ends()
        assert ends == sorted(set(ends)) and ends[-1] == 64 and ends[0] >= 1
        assert len(ends) <= 5
    assert sae.eval().prefix_ends() == [16, 32, 64]
    drawn = {e for _ in range(50) for e in sae.train().prefix_ends()}
    assert len(drawn) > 10  # prefixes really vary


def eager_hierarchical(sae, X):
    P, C, k_child = sae.n_parents, sae.n_children, sae.k_child
    b_pre = rows(sae.b_pre)
    parent_pre = eager_pre(X, rows(sae.W_enc), rows(sae.b_enc), b_pre)
    W_cenc, b_cenc, W_cdec = rows(sae.W_cenc), rows(sae.b_cenc), rows(sae.W_cdec)
    codes = []
    for xi, pre in zip(X, parent_pre, strict=True):
        parents = eager_topk_row(pre, sae.k)
        children = [0.0] * (P * C)
        for p in range(P):
            if parents[p] == 0:
                continue
            child_pre = [
                sum((xi[c] - b_pre[c]) * W_cenc[c][p][i] for c in range(len(xi))) + b_cenc[p][i]
                for i in range(C)
            ]
            for i, value in enumerate(eager_topk_row(child_pre, k_child)):
                children[p * C + i] = value
        codes.append(parents + children)
    dec_rows = rows(sae.W_dec) + [W_cdec[p][i] for p in range(P) for i in range(C)]
    x_hat = eager_decode(codes, dec_rows, b_pre)
    parents_only = eager_decode([f[:P] for f in codes], rows(sae.W_dec), b_pre)
    return codes, x_hat, parents_only


def test_hierarchical_matches_reference():
    sae, x = make("hierarchical"), data()
    X = rows(x)
    codes, x_hat, parents_only = eager_hierarchical(sae, X)
    out = sae(x)
    close(out.codes, codes)
    close(out.x_hat, x_hat)
    close(out.recon_loss, eager_nmse(x_hat, X))
    close(out.aux_loss, 0.5 * eager_nmse(parents_only, X))
    close(out.loss, eager_nmse(x_hat, X) + 0.5 * eager_nmse(parents_only, X))


@settings(max_examples=20, deadline=None)
@given(
    n_parents=st.integers(1, 6),
    n_children=st.integers(1, 4),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_hierarchical_child_never_fires_without_its_parent(n_parents, n_children, k_frac, seed):
    k = max(1, round(k_frac * n_parents))
    k_child = max(1, n_children // 2)
    sae = make(
        "hierarchical",
        n_latents=n_parents * (1 + n_children),
        k=k,
        n_children=n_children,
        k_child=k_child,
        seed=seed,
    )
    with torch.no_grad():
        sae.b_cenc.fill_(50.0)  # children would fire everywhere if the gate let them
        sae.b_enc.normal_(std=1.0)
    codes = sae(data(n=16, seed=seed)).codes
    parents = codes[:, :n_parents]
    children = codes[:, n_parents:].view(16, n_parents, n_children)
    assert ((children != 0).any(dim=-1) <= (parents != 0)).all()
    assert ((children != 0).sum(dim=-1) <= k_child).all()
    assert ((parents != 0).sum(dim=-1) <= k).all()
    # With b_cenc = 50 every active parent has exactly k_child active children.
    assert ((children[parents != 0] > 0).sum(dim=-1) == k_child).all()


# ---- properties every architecture shares -------------------------------------------------


def arch_kwargs(arch: str, n_latents: int, k_frac: float) -> tuple[int, dict]:
    """A valid (n_latents, overrides) for ``arch`` near the drawn width."""
    if arch == "hierarchical":
        n_parents = max(1, n_latents // 3)
        return n_parents * 3, dict(n_children=2, k=max(1, round(k_frac * n_parents)))
    if arch == "matryoshka":
        n_latents = max(n_latents, 2)
        return n_latents, dict(group_fractions=[0.5, 0.5], k=max(1, round(k_frac * n_latents)))
    if "k" in ZOO[arch]:
        return n_latents, dict(k=max(1, round(k_frac * n_latents)))
    return n_latents, {}


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 9), d=st.integers(1, 10), n_latents=st.integers(1, 30), k_frac=st.floats(0, 1)
)
def test_shapes(arch, n, d, n_latents, k_frac):
    n_latents, overrides = arch_kwargs(arch, n_latents, k_frac)
    sae = make(arch, d=d, n_latents=n_latents, **overrides)
    x = torch.randn(n, d, dtype=torch.float64)
    for mode in (sae.train, sae.eval):
        mode()
        out = sae(x)
        assert out.x_hat.shape == (n, d)
        assert out.codes.shape == (n, n_latents) == sae.encode(x).shape
        assert sae.decoder_rows().shape == (n_latents, d)
        assert out.loss.shape == out.recon_loss.shape == ()
        assert torch.isfinite(out.loss)
        assert (out.codes >= 0).all()
        torch.testing.assert_close(sae.decode(out.codes), out.x_hat)


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_config_rebuilds_and_save_load_round_trips_exactly(arch, tmp_path):
    sae, x = make(arch), data(n=16)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(2):  # move weights and buffers (thresholds, rows since fired) off init
        loss = sae.train()(x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    rebuilt = make_sae(**sae.config())
    assert type(rebuilt) is type(sae) and rebuilt.config() == sae.config()
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    assert loaded.config() == sae.config()
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for key, value in sae.state_dict().items():
        expected = value.float() if value.is_floating_point() else value
        torch.testing.assert_close(loaded.state_dict()[key], expected, rtol=0, atol=0)
    sae.float().eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x.float()).x_hat, sae(x.float()).x_hat, rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_a_few_optimizer_steps_reduce_the_loss(arch):
    sae = make(arch, d=8, n_latents=24)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 3, generator=g) @ torch.randn(3, 8, generator=g)).double()
    sae.init_b_pre(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out = sae.train()(x)
        losses.append(out.loss.item())
        opt.zero_grad()
        out.loss.backward()
        if hasattr(sae, "remove_parallel_grad"):
            sae.remove_parallel_grad()
        opt.step()
        if hasattr(sae, "normalize_decoder"):
            sae.normalize_decoder()
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("arch", [a for a in sorted(SAE_REGISTRY) if a != "relu"])
def test_unit_norm_decoders_stay_unit_norm(arch):
    sae, x = make(arch), data(n=32)
    opt = torch.optim.Adam(sae.parameters(), lr=5e-2)
    for name in sae.unit_norm_decoders:
        weight = getattr(sae, name)
        torch.testing.assert_close(
            weight.norm(dim=-1), torch.ones(weight.shape[:-1], dtype=torch.float64)
        )
    for _ in range(10):
        out = sae.train()(x)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad()
        for name in sae.unit_norm_decoders:
            weight = getattr(sae, name)
            assert (weight.grad * weight).sum(-1).abs().max() < 1e-9
        opt.step()
        sae.normalize_decoder()
    for name in sae.unit_norm_decoders:
        weight = getattr(sae, name)
        torch.testing.assert_close(
            weight.norm(dim=-1), torch.ones(weight.shape[:-1], dtype=torch.float64)
        )


@pytest.mark.parametrize(
    "cls,encoder",
    [
        (TopKSAE, "W_enc"),
        (BatchTopKSAE, "W_enc"),
        (JumpReLUSAE, "W_enc"),
        (GatedSAE, "W_gate"),
        (MatryoshkaSAE, "W_enc"),
        (ReLUSAE, "W_enc"),
    ],
)
def test_encoder_starts_as_decoder_transpose(cls, encoder):
    sae = make(cls.arch)
    torch.testing.assert_close(getattr(sae, encoder), sae.W_dec.T)


def test_hierarchical_encoders_start_as_decoder_transposes():
    sae = make("hierarchical")
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_cenc, sae.W_cdec.permute(2, 0, 1))


def test_init_b_pre_geometric_median_mean_zeros_and_unknown():
    sae = make("gated")
    sample = torch.cat([torch.zeros(20, D), torch.full((3, D), 100.0)]).double()
    sae.init_b_pre(sample)
    assert sae.b_pre.abs().max() < 1e-3
    sae.init_b_pre(sample, "mean")
    torch.testing.assert_close(sae.b_pre, sample.mean(0))
    sae.init_b_pre(sample, "zeros")
    assert (sae.b_pre == 0).all()
    with pytest.raises(HsaeError, match="median"):
        sae.init_b_pre(sample, "median")


# ---- configuration and errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kwargs,match",
    [
        ("topk", dict(k=0), "sae.k=0"),
        ("topk", dict(k=3, k_aux=0), "sae.k_aux=0"),
        ("topk", dict(k=3, aux_coeff=-1.0), "sae.aux_coeff"),
        ("batchtopk", dict(k=3, threshold_momentum=0.0), "threshold_momentum"),
        ("relu", dict(l1_coeff=-1.0), "sae.l1_coeff"),
        ("relu", dict(l1_warmup_fraction=2.0), "l1_warmup_fraction"),
        ("jumprelu", dict(bandwidth=0.0), "sae.bandwidth"),
        ("jumprelu", dict(init_threshold=-1.0), "init_threshold"),
        ("matryoshka", dict(k=3, group_fractions=[0.5, 0.2]), "sum to 1"),
        ("matryoshka", dict(k=3, group_fractions=[0.01, 0.99]), "empty group"),
        ("matryoshka", dict(k=3, activation="relu"), "sae.activation"),
        ("hierarchical", dict(k=2, n_children=4), "multiple of"),
        ("hierarchical", dict(k=5, n_children=2), "number of parents"),
        ("hierarchical", dict(k=2, n_children=2, k_child=3), "sae.k_child"),
        ("topk", dict(k=3, bandwidth=0.1), "takes no bandwidth"),
    ],
)
def test_bad_hyperparameters_raise_helpful_errors(arch, kwargs, match):
    with pytest.raises(HsaeError, match=match):
        make_sae(arch, d_model=D, n_latents=L, **kwargs)


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(arch="topk", k=20), "sae.k=20"),
        (dict(arch="hierarchical", n_latents=10, n_children=3), "multiple of"),
        (dict(arch="hierarchical", n_latents=12, n_children=3, k=4), "sae.k=4"),
        (dict(arch="matryoshka", group_fractions=[0.5, 0.6]), "sum"),
        (dict(arch="matryoshka", activation="jump"), "sae.activation"),
        (dict(arch="jumprelu", bandwidth=0.0), "sae.bandwidth"),
        (dict(arch="relu", l1_warmup_fraction=1.5), "l1_warmup_fraction"),
        (dict(arch="topk", k_aux=0), "sae.k_aux"),
    ],
)
def test_sae_config_checks(fields, match):
    with pytest.raises(HsaeError, match=match):
        SAEConfig(**({"n_latents": 16} | fields))


def test_sae_config_k_is_not_checked_for_archs_without_k():
    SAEConfig(arch="relu", n_latents=8, k=16)  # the default k does not bind a ReLU SAE


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_every_arch_has_a_config_file_that_builds_it(arch, compose):
    from hsae.config import RunConfig, to_objects

    cfg = to_objects(compose(["experiment=smoke", "logger=csv", f"sae={arch}"]), RunConfig)
    sae = make_sae(**sae_kwargs(cfg.sae, cfg.backbone.d_model))
    assert sae.arch == arch and sae.n_latents == cfg.sae.n_latents
    assert make_sae(**sae.config()).config() == sae.config()


@pytest.mark.parametrize("arch", sorted(SAE_REGISTRY))
def test_every_arch_names_its_paper(arch):
    doc = sys.modules[SAE_REGISTRY[arch].__module__].__doc__
    assert re.search(r"20\d\d", doc) and re.search(
        r"arXiv:\d{4}\.\d{4,5}|transformer-circuits", doc
    )


def test_training_step_reports_progress_before_the_forward():
    from hsae.training.module import SAEModule

    module = SAEModule(sae=dict(arch="relu", d_model=D, n_latents=L))
    calls = []

    class Stop(Exception):
        pass

    def forward(x):
        calls.append(("forward", module.sae.l1_warmup))
        raise Stop

    module.sae.set_progress = lambda step, total: calls.append(("progress", step, total))
    module.sae.forward = forward

    class FakeTrainer:
        global_step = 7
        estimated_stepping_batches = 700

    module._trainer = FakeTrainer()
    with pytest.raises(Stop):
        module.training_step(torch.zeros(2, D), 0)
    assert calls[0] == ("progress", 7, 700)
    assert calls[1][0] == "forward"
