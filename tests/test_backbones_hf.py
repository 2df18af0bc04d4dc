"""The Hugging Face loader on tiny random CLIP / ViT / DINOv2 models saved to a temporary
folder and loaded through the adapter's local-folder path (HF_HUB_OFFLINE=1 from conftest):
layers, capture against the model's hidden states, preprocessing, and image-tower
fingerprints (a changed text tower keeps them; open_clip and transformers agree)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hsae.backbones import make_backbone, same_image_tower_warning
from hsae.config import BackboneConfig
from hsae.errors import HsaeError
from tests.test_backbones_adapters import hierarcaps_image

transformers = pytest.importorskip("transformers")
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def hf_cfg(folder: Path, d_model: int = 32, layer: int = 1) -> BackboneConfig:
    return BackboneConfig(
        name="hf", loader="hf", model_name=str(folder), d_model=d_model, layer=layer
    )


def tiny_clip_model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 99,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def save_with_processor(model, folder: Path, processor) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A CLIPModel, the same with its text tower changed, and with its image tower changed."""
    root = tmp_path_factory.mktemp("hf_clip")
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    )
    model = tiny_clip_model()
    base = save_with_processor(model, root / "clip", processor)
    with torch.no_grad():
        for p in model.text_model.parameters():
            p.add_(0.5)
        model.text_projection.weight.mul_(2)
    text = save_with_processor(model, root / "clip_text_changed", processor)
    with torch.no_grad():
        model.vision_model.encoder.layers[2].mlp.fc2.bias.add_(1e-3)
    vision = save_with_processor(model, root / "clip_vision_changed", processor)
    return {"base": base, "text": text, "vision": vision}


def test_hf_clip_loads_only_the_image_tower_and_lists_layers(clip_dirs):
    backbone = make_backbone(hf_cfg(clip_dirs["base"]))
    layers = backbone.layers()
    assert [info.index for info in layers] == [0, 1, 2]
    assert all(info.n_tokens == 17 and info.d_model == 32 for info in layers)  # 4x4 + CLS
    assert layers[0].name.endswith("layers.0")
    assert not any("text" in key for key in backbone.model.state_dict())
    assert backbone.pre.size == (32, 32) and backbone.pre.resize == (40,)


def test_hf_capture_equals_the_models_hidden_states(clip_dirs):
    backbone = make_backbone(hf_cfg(clip_dirs["base"]))
    images = torch.randn(2, 3, 32, 32)
    both = backbone.capture(images, [0, 2])
    hidden = backbone.model(pixel_values=images, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output; block i's output is hidden_states[i + 1].
    torch.testing.assert_close(both[0], hidden[1])
    torch.testing.assert_close(both[2], hidden[3])


def test_text_tower_changes_keep_the_image_fingerprint(clip_dirs):
    base = make_backbone(hf_cfg(clip_dirs["base"])).fingerprint()
    text = make_backbone(hf_cfg(clip_dirs["text"])).fingerprint()
    vision = make_backbone(hf_cfg(clip_dirs["vision"])).fingerprint()
    assert base == text
    assert vision != base
    warning = same_image_tower_warning(
        {"clip_vit_b32": base, "reclip_vit_b32": text, "other": vision}
    )
    assert warning is not None
    assert "clip_vit_b32 and reclip_vit_b32" in warning and "noise" in warning
    assert "other" not in warning
    assert same_image_tower_warning({"clip_vit_b32": base, "other": vision}) is None


def test_open_clip_and_hf_clip_with_the_same_weights_agree(tmp_path, tiny_backbone):
    """hsae's tiny open_clip ViT, converted to a CLIPVisionModel: one fingerprint, equal
    activations at every block (so clip_vit_b32 and RE-CLIP compare across loaders)."""
    from hsae.backbones.open_clip import clip_canonical

    config = transformers.CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        hidden_act="gelu",  # open_clip's non-OpenAI configs use exact GELU
        layer_norm_eps=1e-5,
    )
    model = transformers.CLIPVisionModel(config)
    state = clip_canonical(tiny_backbone.model.visual.state_dict())
    assert state is not None
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    )
    hf = make_backbone(hf_cfg(save_with_processor(model, tmp_path / "m", processor), 128, 2))
    assert hf.fingerprint() == tiny_backbone.fingerprint()
    assert hf.pre == tiny_backbone.pre
    images = torch.randn(2, 3, 64, 64)
    ours, theirs = tiny_backbone.capture(images, [0, 3]), hf.capture(images, [0, 3])
    for layer in (0, 3):
        torch.testing.assert_close(ours[layer], theirs[layer], atol=1e-4, rtol=1e-4)


def test_hf_vit_and_dinov2(tmp_path):
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY_VISION), add_pooling_layer=False)
    vit_dir = save_with_processor(
        vit, tmp_path / "vit", transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    )
    # DINOv2 checkpoints are built for 518 px and cropped to 224: tokens follow the crop.
    dino = transformers.Dinov2Model(transformers.Dinov2Config(**{**TINY_VISION, "image_size": 64}))
    dino_dir = save_with_processor(
        dino,
        tmp_path / "dino",
        transformers.BitImageProcessor(
            size={"shortest_edge": 36},
            crop_size={"height": 32, "width": 32},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
    )
    for folder in (vit_dir, dino_dir):
        backbone = make_backbone(hf_cfg(folder, layer=2))
        assert [(i.n_tokens, i.d_model) for i in backbone.layers()] == [(17, 32)] * 3
        images = torch.randn(2, 3, 32, 32)
        hidden = backbone.model(pixel_values=images, output_hidden_states=True).hidden_states
        torch.testing.assert_close(backbone.capture(images, [1])[1], hidden[2])
    assert make_backbone(hf_cfg(vit_dir)).pre.resize_mode == "squash"


def test_hf_checkpoint_without_processor_uses_the_standard_one(tmp_path, caplog):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(tmp_path / "bare")
    with caplog.at_level("WARNING"):
        backbone = make_backbone(hf_cfg(tmp_path / "bare"))
    assert "no preprocessor_config.json" in caplog.text
    assert backbone.pre.size == (32, 32) and backbone.pre.interpolation == "bicubic"


def test_hf_incomplete_checkpoint_is_an_error_not_random_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "layers.1.mlp.fc1.weight" in k)
    del state[key]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(HsaeError, match="lacks image-tower weights"):
        make_backbone(hf_cfg(tmp_path / "cut"))


def test_hf_errors_name_the_model(tmp_path):
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    bert.save_pretrained(tmp_path / "bert")
    with pytest.raises(HsaeError, match="'bert' model; the hf loader supports clip"):
        make_backbone(hf_cfg(tmp_path / "bert"))
    with pytest.raises(HsaeError, match="could not load the Hugging Face config"):
        make_backbone(hf_cfg(Path("no-such-user/no-such-model")))


def test_preprocess_matches_the_hf_image_processor(clip_dirs):
    image = hierarcaps_image()
    hf = make_backbone(hf_cfg(clip_dirs["base"]))
    processor = transformers.AutoImageProcessor.from_pretrained(clip_dirs["base"])
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert hf.preprocess(image).shape == theirs.shape == (3, 32, 32)
    # transformers resizes with its own code: equal up to resampling differences.
    assert (hf.preprocess(image) - theirs).abs().mean() < 0.02
