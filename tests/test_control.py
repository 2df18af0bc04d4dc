"""Steering with a latent moves the backbone's prediction toward the latent's class when the
latent's direction carries that class, and not when it is a random direction."""

import pytest
import torch

from hsae.control import clamp_edit, clamp_hit_rate, fit_readout, latent_direction
from hsae.data.synthetic import SyntheticShapes
from hsae.errors import HsaeError
from hsae.sae import TopKSAE
from tests.conftest import perfect_and_null_sae

LAYER = 2


@pytest.fixture(scope="module")
def setup(tiny_backbone):
    torch.manual_seed(0)
    data = SyntheticShapes(120, seed=5)
    images = torch.stack([tiny_backbone.preprocess(data.render(i)) for i in range(len(data))])
    labels = torch.as_tensor(data.labels_nl[:, 0])  # family: 3 classes
    readout = fit_readout(tiny_backbone, images, labels, 3)
    return images, labels, readout


def class_gradient(backbone, images, readout, cls):
    """The CLS-token direction at LAYER that most raises class ``cls``'s readout logit."""
    visual, store = backbone.model.visual, {}

    def hook(_module, _inputs, output):
        store["x"] = output.detach().requires_grad_(True)
        return store["x"]

    handle = visual.transformer.resblocks[LAYER].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = readout.logits(visual(images))
            (logits[:, cls] - logits.mean(dim=1)).sum().backward()
    finally:
        handle.remove()
    grad = store["x"].grad[:, 0].mean(dim=0)
    return grad / grad.norm()


def sae_with_directions(directions):
    sae = TopKSAE(d_model=directions.shape[1], n_latents=directions.shape[0], k=1)
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
    return sae.eval()


def test_planted_latents_steer_and_random_ones_do_not(tiny_backbone, setup):
    images, labels, readout = setup
    planted = torch.stack([class_gradient(tiny_backbone, images, readout, c) for c in range(3)])
    random = torch.nn.functional.normalize(torch.randn(3, planted.shape[1]), dim=1)
    cls_norm = float(tiny_backbone.capture(images, [LAYER])[LAYER][:, 0].norm(dim=-1).mean())
    kwargs = dict(latents=[0, 1, 2], latent_classes=[0, 1, 2], values=[2.0 * cls_norm] * 3)
    high = clamp_hit_rate(
        tiny_backbone, sae_with_directions(planted), LAYER, "cls", images, labels, readout, **kwargs
    )
    low = clamp_hit_rate(
        tiny_backbone, sae_with_directions(random), LAYER, "cls", images, labels, readout, **kwargs
    )
    assert float(high.hit_rate_k.mean()) > 0.8
    assert float(high.hit_rate_k.mean()) > float(low.hit_rate_k.mean()) + 0.4
    assert (high.delta_p_k > 0).all()
    assert float(high.baseline_k.mean()) < 0.5
    metrics = high.metrics()
    assert set(metrics) == {"control/hit_rate", "control/hit_rate_baseline", "control/delta_p"}


def test_clamp_replaces_the_latent_in_the_reconstruction_and_keeps_the_error():
    """Edited = x + (value - f_j(x)) d_j: the SAE's reconstruction with latent j set to
    ``value``, plus the same reconstruction error as before."""
    torch.manual_seed(1)
    sae = TopKSAE(d_model=8, n_latents=16, k=4).eval()
    acts = torch.randn(4, 5, 8)  # [batch, tokens, d]: token 0 is CLS
    before = acts.clone()
    clamp_edit(sae, latent=3, value=7.0, tokens="cls", n_prefix_tokens=1)(acts)
    assert torch.equal(acts[:, 1:], before[:, 1:])  # patch tokens untouched
    codes = sae.encode(before[:, 0])
    error = before[:, 0] - sae.decode(codes)
    codes[:, 3] = 7.0
    torch.testing.assert_close(acts[:, 0], sae.decode(codes) + error, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent_direction(sae, 3), sae.W_dec[3].detach())

    patches = before.clone()
    clamp_edit(sae, latent=3, value=7.0, tokens="mean", n_prefix_tokens=1)(patches)
    torch.testing.assert_close(patches[:, 0], before[:, 0])  # CLS untouched
    shift = patches[:, 1:] - before[:, 1:]
    torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))  # the same for every patch


def test_images_all_of_the_latents_class_are_an_error(tiny_backbone, setup):
    images, labels, readout = setup
    sae = sae_with_directions(torch.eye(128)[:2])
    with pytest.raises(HsaeError, match="other classes"):
        clamp_hit_rate(
            tiny_backbone, sae, LAYER, "cls", images[labels == 0], labels[labels == 0], readout,
            latents=[0], latent_classes=[0], values=[1.0],
        )  # fmt: skip


def test_zero_shot_with_a_perfect_sae_equals_the_original_and_a_null_sae_the_ablation(
    tiny_backbone, setup
):
    from hsae.control import spliced_zero_shot
    from hsae.data.synthetic import HIERARCHY

    images, labels, _ = setup
    d = 128
    perfect, null = perfect_and_null_sae(d)
    names = list(HIERARCHY.class_names[0])
    good = spliced_zero_shot(tiny_backbone, perfect, LAYER, "cls", images, labels, names)
    bad = spliced_zero_shot(tiny_backbone, null, LAYER, "cls", images, labels, names)
    assert good["fidelity/zero_shot/spliced"] == good["fidelity/zero_shot/original"]
    assert bad["fidelity/zero_shot/spliced"] == bad["fidelity/zero_shot/ablated"]
    assert 0 <= good["fidelity/zero_shot/original"] <= 1
