"""The timm and torchvision adapters on small random models built here (no downloads):
layer listing, capture against the model's own forward, token selection (CNN positions,
prefix tokens), and preprocessing against each library's own transform. The Hugging Face
loader is in test_backbones_hf.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from hsae.backbones import make_backbone, select_tokens
from hsae.config import BackboneConfig
from hsae.errors import HsaeError
from tests.conftest import HIERARCAPS_IMAGES

# ---- timm ----------------------------------------------------------------------------


def timm_cfg(model_name: str, d_model: int, layer: int, tokens: str = "cls") -> BackboneConfig:
    return BackboneConfig(
        name=model_name,
        loader="timm",
        model_name=model_name,
        d_model=d_model,
        layer=layer,
        tokens=tokens,
    )


@pytest.fixture(scope="module")
def deit():
    return make_backbone(timm_cfg("deit_tiny_distilled_patch16_224", 192, 3))


@pytest.fixture(scope="module")
def alexnet():
    return make_backbone(tv_cfg("alexnet", 4096, 6))


@pytest.fixture(scope="module")
def tv_resnet18():
    return make_backbone(tv_cfg("resnet18", 512, 4))


def test_timm_vit_layers_capture_and_prefix_tokens(deit):
    backbone = deit
    layers = backbone.layers()
    assert len(layers) == 12 and layers[3].name == "blocks.3"
    assert layers[3].n_tokens == 198  # 14x14 patches + CLS + distillation token
    assert backbone.has_cls and backbone.n_prefix_tokens == 2
    model = backbone.model
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks[:4]:
            x = block(x)
    acts = backbone.capture(images, [3])[3]
    torch.testing.assert_close(acts, x)
    rows, index = backbone.select(acts, "patch")
    assert rows.shape == (2 * 196, 192) and index[0] == 2
    torch.testing.assert_close(rows[196], acts[1, 2])


def test_timm_resnet_stages_are_layers_and_mean_is_global_average_pool():
    backbone = make_backbone(timm_cfg("resnet10t", 512, 4, tokens="mean"))
    assert [i.name for i in backbone.layers()] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    # resnet10t's tag preprocesses to 176 px: strides 2, 4, 8, 16, 32.
    assert [i.n_tokens for i in backbone.layers()] == [88 * 88, 44 * 44, 22 * 22, 11 * 11, 36]
    assert not backbone.has_cls
    images = torch.randn(2, 3, 176, 176)
    acts = backbone.capture(images, [4])[4]
    with torch.no_grad():
        features = backbone.model.forward_features(images)
    rows, _ = backbone.select(acts, "mean")
    torch.testing.assert_close(rows, features.mean(dim=(2, 3)))
    # Token t is position (t // 6, t % 6) of the feature map.
    torch.testing.assert_close(acts[1, 6 * 3 + 5], features[1, :, 3, 5])
    with pytest.raises(HsaeError, match="no CLS token"):
        backbone.select(acts, "cls")
    with pytest.raises(HsaeError, match="tokens=mean"):
        make_backbone(timm_cfg("resnet10t", 512, 4, tokens="cls"))


def test_timm_unknown_model_and_bad_pretrained():
    with pytest.raises(HsaeError, match="not a timm model"):
        make_backbone(timm_cfg("resnet_nonexistent_99", 8, 0))
    with pytest.raises(HsaeError, match="neither 'hub'"):
        make_backbone(replace(timm_cfg("resnet18", 64, 0, "mean"), pretrained="/no/such.pth"))


# ---- torchvision ---------------------------------------------------------------------


def tv_cfg(model_name: str, d_model: int, layer: int, **kw) -> BackboneConfig:
    return BackboneConfig(
        name=model_name,
        loader="torchvision",
        model_name=model_name,
        d_model=d_model,
        layer=layer,
        tokens=kw.pop("tokens", "mean"),
        **kw,
    )


def test_torchvision_alexnet_conv_and_fc_layers(alexnet):
    backbone = alexnet
    widths = [(i.n_tokens, i.d_model) for i in backbone.layers()]
    assert widths == [
        (3025, 64),
        (729, 192),
        (169, 384),
        (169, 256),
        (169, 256),
        (1, 4096),
        (1, 4096),
    ]
    model = backbone.model
    images = torch.randn(2, 3, 224, 224)
    both = backbone.capture(images, [4, 6])  # later in-place ReLUs must not change conv5
    with torch.no_grad():
        conv5 = model.features[:12](images)
        fc7 = model.classifier[:6](torch.flatten(model.avgpool(model.features(images)), 1))
    torch.testing.assert_close(both[4], conv5.flatten(2).transpose(1, 2))
    torch.testing.assert_close(both[6], fc7[:, None])


def test_torchvision_resnet_and_weights(tmp_path, tv_resnet18):
    import torchvision

    backbone = tv_resnet18
    assert [i.name for i in backbone.layers()] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert backbone.pre.resize == (256,) and backbone.pre.interpolation == "bilinear"
    with pytest.raises(HsaeError, match="IMAGENET1K_V1"):
        make_backbone(tv_cfg("resnet18", 512, 4, pretrained="IMAGENET9K"))
    # A local state dict loads; random weights follow init_seed.
    torch.manual_seed(5)
    state_path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), state_path)
    loaded = make_backbone(tv_cfg("resnet18", 512, 4, pretrained=str(state_path)))
    assert loaded.fingerprint() != backbone.fingerprint()
    assert (
        make_backbone(tv_cfg("resnet18", 512, 4, init_seed=5)).fingerprint() == loaded.fingerprint()
    )


# ---- preprocessing: PIL and tensors, against each library's own transform ------------


def hierarcaps_image() -> Image.Image:
    image = Image.open(HIERARCAPS_IMAGES / "COCO_val2014_000000000802.jpg").convert("RGB")
    # A 256x256 photo as HierarCaps ships it; a 256x180 part makes resize and crop both matter.
    return image.crop((0, 0, 256, 180))


def test_preprocess_matches_open_clip_timm_and_torchvision(tiny_backbone, deit, alexnet):
    import open_clip
    import timm.data
    import torchvision

    image = hierarcaps_image()
    pre = tiny_backbone.pre
    theirs = open_clip.image_transform(
        pre.size, is_train=False, mean=pre.mean, std=pre.std, interpolation="bicubic"
    )(image)
    torch.testing.assert_close(tiny_backbone.preprocess(image), theirs)

    theirs = timm.data.create_transform(
        **timm.data.resolve_model_data_config(deit.model), is_training=False
    )(image)
    torch.testing.assert_close(deit.preprocess(image), theirs)

    theirs = torchvision.models.AlexNet_Weights.DEFAULT.transforms()(image)
    torch.testing.assert_close(alexnet.preprocess(image), theirs)


def test_preprocess_of_a_tensor_matches_the_pil_path(tiny_backbone):
    image = hierarcaps_image()
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    from_pil, from_tensor = tiny_backbone.preprocess(image), tiny_backbone.preprocess(tensor)
    assert from_tensor.shape == from_pil.shape == (3, 64, 64)
    # torch's antialiased resampling differs from PIL's by a few grey levels, no more.
    assert (from_pil - from_tensor).abs().mean() < 0.03
    uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    torch.testing.assert_close(tiny_backbone.preprocess(uint8), from_tensor)
    with pytest.raises(HsaeError, match=r"\[3, H, W\]"):
        tiny_backbone.preprocess(torch.rand(64, 64))


def test_select_tokens_with_prefix_tokens():
    acts = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    rows, index = select_tokens(acts, "patch", has_cls=True, n_prefix=3)
    assert index.tolist() == [3, 4, 5] and rows.flatten().tolist() == [3, 4, 5, 9, 10, 11]
    rows, _ = select_tokens(acts, "mean", has_cls=True, n_prefix=3)
    assert rows.flatten().tolist() == [4.0, 10.0]


def test_layer_listing_is_json_friendly(tiny_backbone):
    # The manifest records the hooked layer; LayerInfo must serialise plainly.
    from dataclasses import asdict

    assert json.loads(json.dumps(asdict(tiny_backbone.layers()[0])))["n_tokens"] == 65
