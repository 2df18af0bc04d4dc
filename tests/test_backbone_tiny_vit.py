"""The open_clip path with hsae's tiny ViT config (random weights, no downloads)."""

import pytest
import torch

from hsae.backbones import POOLED_TOKEN, make_backbone, select_tokens
from hsae.config import BackboneConfig
from hsae.errors import HsaeError


def test_layers_listed(tiny_backbone):
    layers = tiny_backbone.layers()
    assert [info.index for info in layers] == [0, 1, 2, 3]
    assert all(info.n_tokens == 65 and info.d_model == 128 for info in layers)
    assert layers[2].name == "visual.transformer.resblocks.2"


def test_capture_several_layers_in_one_pass_equals_separate(tiny_backbone):
    images = torch.randn(3, 3, 64, 64)
    both = tiny_backbone.capture(images, [1, 3])
    torch.testing.assert_close(both[1], tiny_backbone.capture(images, [1])[1])
    torch.testing.assert_close(both[3], tiny_backbone.capture(images, [3])[3])
    assert both[1].shape == (3, 65, 128)


def test_capture_matches_the_models_own_blocks(tiny_backbone):
    images = torch.randn(2, 3, 64, 64)
    visual = tiny_backbone.model.visual
    x = visual._embeds(images) if hasattr(visual, "_embeds") else None
    assert x is not None, "open_clip VisionTransformer._embeds changed"
    for block in visual.transformer.resblocks[:3]:
        x = block(x)
    torch.testing.assert_close(tiny_backbone.capture(images, [2])[2], x)


@pytest.mark.parametrize(
    "tokens,rows_per_image,token_index",
    [
        ("cls", 1, [0]),
        ("patch", 64, list(range(1, 65))),
        ("mean", 1, [POOLED_TOKEN]),
        ("all", 65, list(range(65))),
    ],
)
def test_token_selection(tokens, rows_per_image, token_index):
    acts = torch.randn(2, 65, 8)
    rows, index = select_tokens(acts, tokens)
    assert rows.shape == (2 * rows_per_image, 8)
    assert index.tolist() == token_index
    if tokens == "mean":
        torch.testing.assert_close(rows[1], acts[1, 1:].mean(0))
    if tokens == "patch":
        torch.testing.assert_close(rows[64 + 5], acts[1, 6])


def test_no_cls_token_is_a_clear_error():
    with pytest.raises(HsaeError, match="no CLS token"):
        select_tokens(torch.randn(1, 4, 2), "cls", has_cls=False)


def test_layer_out_of_range_names_the_valid_range():
    cfg = BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=9)
    with pytest.raises(HsaeError, match=r"valid layers are 0\.\.3"):
        make_backbone(cfg)


def test_width_mismatch_is_reported():
    cfg = BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=64, layer=1)
    with pytest.raises(HsaeError, match=r"backbone\.d_model=128"):
        make_backbone(cfg)


def test_unknown_model_name():
    cfg = BackboneConfig(name="x", model_name="ViT-Q-99", d_model=128, layer=1)
    with pytest.raises(HsaeError, match="not an open_clip model"):
        make_backbone(cfg)


def test_fingerprint_tracks_weights(tiny_backbone):
    same = make_backbone(BackboneConfig(name="t", model_name="hsae-tiny-vit", d_model=128, layer=0))
    other = make_backbone(
        BackboneConfig(name="t", model_name="hsae-tiny-vit", d_model=128, layer=0, init_seed=1)
    )
    assert same.fingerprint() == tiny_backbone.fingerprint()
    assert other.fingerprint() != tiny_backbone.fingerprint()


def test_preprocess_resizes_and_normalises(tiny_backbone):
    out = tiny_backbone.preprocess(torch.rand(3, 100, 80))
    assert out.shape == (3, 64, 64)
    grey = tiny_backbone.preprocess(torch.full((3, 64, 64), 0.5))
    torch.testing.assert_close(
        grey[:, 0, 0], (0.5 - tiny_backbone.mean.flatten()) / tiny_backbone.std.flatten()
    )
