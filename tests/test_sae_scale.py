"""Input normalisation: every architecture sees rows of unit mean squared norm, the scale is
folded into the weights on save, and training does not depend on the activations' scale."""

import pytest
import torch
from safetensors.torch import save_file

from hsae.errors import HsaeError
from hsae.sae import SAE_REGISTRY, load_sae, make_sae, save_sae
from hsae.sae.base import geometric_median


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


D, L = 6, 24
ZOO = {
    "relu": dict(l1_coeff=0.7),
    "topk": dict(k=3, k_aux=2, dead_tokens_threshold=40),
    "batchtopk": dict(k=3, threshold_momentum=0.25),
    # Thresholds and bandwidth in normalised units, where rows have norm ~1.
    "jumprelu": dict(bandwidth=0.2, sparsity_coeff=0.05, init_threshold=0.1),
    "gated": dict(l1_coeff=0.4),
    "matryoshka": dict(k=3, group_fractions=[0.25, 0.25, 0.5]),
    "hierarchical": dict(k=2, n_children=2, parent_recon_coeff=0.3),
}
ARCHS = sorted(SAE_REGISTRY)


def data(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Low-rank rows plus noise and an offset, times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, D, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 3, generator=g) @ basis + 0.1 * torch.randn(n, D, generator=g) + 0.5
    return x * scale


def train(arch: str, x: torch.Tensor, scale_inputs: bool = True, n_steps: int = 12):
    """A few Adam steps as the training module takes them, from one seed."""
    torch.manual_seed(0)
    sae = make_sae(arch, d_model=D, n_latents=L, **ZOO[arch])
    if scale_inputs:
        sae.set_input_scale(x)
    sae.init_b_pre(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    batch = len(x) // n_steps
    for step in range(n_steps):
        out = sae.train()(x[step * batch : (step + 1) * batch])
        opt.zero_grad()
        out.loss.backward()
        if hasattr(sae, "remove_parallel_grad"):
            sae.remove_parallel_grad()
        opt.step()
        if hasattr(sae, "normalize_decoder"):
            sae.normalize_decoder()
    return sae.eval()


# ---- set_input_scale -----------------------------------------------------------------------


def test_set_input_scale_gives_rows_of_unit_mean_squared_norm():
    sae, x = make_sae("topk", d_model=D, n_latents=L, k=3), data(200, 1, scale=37.0)
    scale = sae.set_input_scale(x)
    expected = (sum(float(row @ row) for row in x.double()) / len(x)) ** 0.5
    assert scale == pytest.approx(expected, rel=1e-6)
    assert float(sae.input_scale) == pytest.approx(expected, rel=1e-6)
    assert float((x / sae.input_scale).pow(2).sum(-1).mean()) == pytest.approx(1.0, rel=1e-5)


def test_init_b_pre_and_set_input_scale_commute():
    x = data(100, 2, scale=37.0)
    first = make_sae("gated", d_model=D, n_latents=L)
    first.init_b_pre(x)
    first.set_input_scale(x)
    second = make_sae("gated", d_model=D, n_latents=L)
    second.set_input_scale(x)
    second.init_b_pre(x)
    torch.testing.assert_close(first.b_pre, second.b_pre)
    # Stored in normalised units: the median in input units once multiplied back.
    torch.testing.assert_close(first.b_pre * first.input_scale, geometric_median(x))
    torch.testing.assert_close(first.decode(torch.zeros(1, L))[0], geometric_median(x))


@pytest.mark.parametrize(
    "sample,match",
    [
        (torch.zeros(8, D), "all zeros"),
        (torch.ones(8, D + 1), "d_model=6"),
        (torch.ones(D), "got shape"),
    ],
)
def test_set_input_scale_rejects_bad_samples(sample, match):
    with pytest.raises(HsaeError, match=match):
        make_sae("topk", d_model=D, n_latents=L, k=3).set_input_scale(sample)


def test_the_architecture_sees_normalised_inputs():
    sae, x = make_sae("topk", d_model=D, n_latents=L, k=3), data(64, 3, scale=37.0)
    sae.set_input_scale(x)
    seen = []
    inner = sae._forward
    sae._forward = lambda x_norm: seen.append(x_norm) or inner(x_norm)
    out = sae(x)
    torch.testing.assert_close(seen[0], x / sae.input_scale)
    torch.testing.assert_close(out.codes, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae.decode(out.codes))
    # Reconstructions come back in input units: an untrained TopK SAE gets the scale right.
    ratio = out.x_hat.detach().norm(dim=-1).mean() / x.norm(dim=-1).mean()
    assert 0.2 < float(ratio) < 5


# ---- folding on save -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_save_folds_the_scale_and_keeps_codes_and_reconstructions(arch, tmp_path):
    sae = train(arch, data(240, 4, scale=37.0))
    with torch.no_grad():  # biases off their init, so folding must leave them right too
        for name, param in sae.named_parameters():
            if name.startswith(("b_enc", "b_gate", "b_mag", "r_mag", "b_cenc")):
                param.add_(torch.randn_like(param) * 0.1)
    scale = float(sae.input_scale)
    assert scale > 30
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path).eval()
    x = data(50, 5, scale=37.0)  # fresh rows: none sits exactly on a learned threshold
    torch.testing.assert_close(loaded.encode(x), sae.encode(x))
    torch.testing.assert_close(loaded(x).codes, sae(x).codes)
    # Rows of norm ~100 in float32: rounding of the folded weights shows at 1e-5 relative.
    recon = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, **recon)
    torch.testing.assert_close(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)), **recon)
    # The file carries no scale to apply: it is in the weights.
    assert float(loaded.input_scale) == 1.0
    assert loaded.folded_input_scale == pytest.approx(scale)
    torch.testing.assert_close(loaded.b_pre, sae.b_pre * scale)
    if hasattr(sae, "unit_norm_decoders"):
        for name in sae.unit_norm_decoders:
            norms = getattr(loaded, name).norm(dim=-1)
            torch.testing.assert_close(norms, torch.full_like(norms, scale))


@pytest.mark.parametrize("arch", ["jumprelu", "hierarchical"])
def test_load_unfold_gives_back_the_training_form(arch, tmp_path):
    sae = train(arch, data(240, 6, scale=37.0), n_steps=4)
    save_sae(sae, tmp_path)
    unfolded = load_sae(tmp_path, unfold=True)
    assert unfolded.folded_input_scale == 1.0
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(unfolded.state_dict()[name], value, msg=name)
    unfolded.normalize_decoder()  # allowed again: rows are unit norm
    unfolded.set_input_scale(data(50, 7))


def test_a_folded_sae_refuses_renormalising_and_rescaling(tmp_path):
    (tmp_path / "again").mkdir()
    save_sae(train("topk", data(240, 8, scale=37.0), n_steps=4), tmp_path)
    loaded = load_sae(tmp_path)
    with pytest.raises(HsaeError, match="unfold=True"):
        loaded.normalize_decoder()
    with pytest.raises(HsaeError, match="unfold=True"):
        loaded.set_input_scale(data(10, 9))
    save_sae(loaded, tmp_path / "again")  # still folded: saved again, the scale stays known
    torch.testing.assert_close(
        load_sae(tmp_path / "again", unfold=True).W_dec.norm(dim=-1), torch.ones(L)
    )


def test_scale_one_saves_bit_for_bit(tmp_path):
    sae = train("batchtopk", data(240, 10), scale_inputs=False, n_steps=4)
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    assert loaded.folded_input_scale == 1.0
    loaded.normalize_decoder()


def test_files_from_before_input_normalisation_load_unscaled(tmp_path):
    import json

    sae = make_sae("topk", d_model=D, n_latents=L, k=3)
    state = {k: v for k, v in sae.state_dict().items() if k != "input_scale"}
    save_file(state, str(tmp_path / "sae.safetensors"), {"config": json.dumps(sae.config())})
    loaded = load_sae(tmp_path)
    assert float(loaded.input_scale) == 1.0 and loaded.folded_input_scale == 1.0
    x = data(10, 11)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat, rtol=0, atol=0)


# ---- scale invariance of training ----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_training_on_inputs_times_1000_matches_training_on_the_inputs(arch):
    x, x_test = data(240, 12), data(50, 13)
    plain = train(arch, x)
    scaled = train(arch, 1000 * x)
    torch.testing.assert_close(
        scaled.encode(1000 * x_test), plain.encode(x_test), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        scaled(1000 * x_test).x_hat / 1000, plain(x_test).x_hat, rtol=1e-4, atol=1e-5
    )


def test_without_the_input_scale_jumprelu_depends_on_the_scale():
    """What set_input_scale buys: JumpReLU's thresholds in raw units fire on everything."""
    x, x_test = data(240, 14), data(50, 15)
    l0 = lambda sae, x: float((sae.encode(x) != 0).sum(-1).float().mean())  # noqa: E731
    plain, scaled = train("jumprelu", x), train("jumprelu", 1000 * x)
    raw = train("jumprelu", 1000 * x, scale_inputs=False)
    assert l0(plain, x_test) == pytest.approx(l0(scaled, 1000 * x_test))
    assert l0(raw, 1000 * x_test) > l0(plain, x_test) + 1
