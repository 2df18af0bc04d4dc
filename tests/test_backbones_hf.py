"""The Hugging Face loader on tiny random CLIP / ViT / DINOv2 models saved to a temporary
folder and loaded through the adapter's local-folder path (HF_HUB_OFFLINE=1 from conftest):
layers, capture against the model's hidden states, preprocessing, image-tower fingerprints
(a changed text tower keeps them; open_clip and transformers agree), and a CLIPModel's joint
image-text space (against get_text_features / get_image_features, HierarCaps, zero-shot)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from hsae.backbones import make_backbone, same_image_tower_warning
from hsae.config import BackboneConfig
from hsae.errors import HsaeError
from tests.conftest import HIERARCAPS_IMAGES, perfect_and_null_sae
from tests.test_backbones_adapters import hierarcaps_image

transformers = pytest.importorskip("transformers")
# A CLIP BPE vocabulary as OpenAI's, only smaller: 256 byte symbols, the same with "</w>", the
# first N_MERGES merges of open_clip's bundled OpenAI vocabulary, then the two special tokens.
N_MERGES = 200
TINY_VOCAB = 2 * 256 + N_MERGES + 2
BOS, EOS = TINY_VOCAB - 2, TINY_VOCAB - 1
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


def tiny_clip_model(seed: int = 0, **text):
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": TINY_VOCAB,
            "max_position_embeddings": 16,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "pad_token_id": EOS,
            **text,
        },
        vision_config=TINY_VISION,
        projection_dim=16,
    )
    return transformers.CLIPModel(config)


def save_with_processor(model, folder: Path, processor) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_clip_tokenizer(folder: Path) -> Path:
    """vocab.json and merges.txt, the files of a hub CLIP tokenizer (built offline)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 1 + N_MERGES]
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab)) == TINY_VOCAB
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A CLIPModel (without a tokenizer: image tower only), the same with a tokenizer
    ("joint"), with its text tower changed (with a tokenizer too), and with its image tower
    changed."""
    root = tmp_path_factory.mktemp("hf_clip")
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    )
    model = tiny_clip_model()
    base = save_with_processor(model, root / "clip", processor)
    joint = write_clip_tokenizer(save_with_processor(model, root / "clip_joint", processor))
    with torch.no_grad():
        for p in model.text_model.parameters():
            p.add_(0.5)
        model.text_projection.weight.mul_(2)
    text = write_clip_tokenizer(save_with_processor(model, root / "clip_text_changed", processor))
    with torch.no_grad():
        model.vision_model.encoder.layers[2].mlp.fc2.bias.add_(1e-3)
    vision = save_with_processor(model, root / "clip_vision_changed", processor)
    return {"base": base, "joint": joint, "text": text, "vision": vision}


def features(output) -> torch.Tensor:
    """get_*_features' result: a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_hf_clip_without_a_tokenizer_loads_only_the_image_tower(clip_dirs, caplog):
    with caplog.at_level("WARNING"):
        backbone = make_backbone(hf_cfg(clip_dirs["base"]))
    assert "loading its image tower only" in caplog.text and "vocab.json" in caplog.text
    assert not hasattr(backbone, "encode_text")
    with pytest.raises(AttributeError, match="no text tower"):
        backbone.encode_text(["a dog"])
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
    joint = make_backbone(hf_cfg(clip_dirs["joint"])).fingerprint()
    text = make_backbone(hf_cfg(clip_dirs["text"])).fingerprint()
    vision = make_backbone(hf_cfg(clip_dirs["vision"])).fingerprint()
    assert base == joint == text  # the text tower and the projections never count
    assert vision != base
    warning = same_image_tower_warning(
        {"clip_vit_b32": base, "reclip_vit_b32": text, "other": vision}
    )
    assert warning is not None
    assert "clip_vit_b32 and reclip_vit_b32" in warning and "noise" in warning
    assert "other" not in warning
    assert same_image_tower_warning({"clip_vit_b32": base, "other": vision}) is None


def test_hf_clip_with_a_tokenizer_has_the_joint_space_of_get_features(clip_dirs):
    backbone = make_backbone(hf_cfg(clip_dirs["text"]))
    reference = transformers.CLIPModel.from_pretrained(clip_dirs["text"]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip_dirs["text"])
    long = "a large brown dog running on the green grass of a park next to a small red ball"
    texts = ["a photo of a dog.", "", long]
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert tokens["input_ids"][2, -1] == EOS  # truncated, yet still ends where CLIP pools
    with torch.no_grad():
        expected = features(reference.get_text_features(**tokens))
    text = backbone.encode_text(texts)
    assert text.shape == (3, 16)  # projection_dim
    torch.testing.assert_close(text, expected)
    # Padding is inert (up to float error: the batch has another shape).
    torch.testing.assert_close(backbone.encode_text(texts[:1]), text[:1], atol=1e-4, rtol=1e-4)

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = features(reference.get_image_features(pixel_values=images))
    torch.testing.assert_close(backbone.forward_edited(images, 2, None), expected)
    # Layers and activations are those of the image-tower-only load of the same weights.
    image_only = make_backbone(hf_cfg(clip_dirs["base"]))
    assert [(i.n_tokens, i.d_model) for i in backbone.layers()] == [
        (i.n_tokens, i.d_model) for i in image_only.layers()
    ]
    torch.testing.assert_close(backbone.capture(images, [1])[1], image_only.capture(images, [1])[1])


def test_hf_clip_without_text_weights_loads_only_the_image_tower(clip_dirs, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "cut"
    folder.mkdir()
    for path in clip_dirs["joint"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    state = load_file(folder / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        backbone = make_backbone(hf_cfg(folder))
    assert "text_projection.weight" in caplog.text and "image tower only" in caplog.text
    assert not hasattr(backbone, "encode_text")
    assert backbone.fingerprint() == make_backbone(hf_cfg(clip_dirs["joint"])).fingerprint()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ({"vocab_size": TINY_VOCAB - 10}, "but the text tower only"),
        ({"eos_token_id": BOS}, "would not pool at its tokenizer's end-of-text"),
        ({"eos_token_id": 2}, ""),  # legacy: pools at the highest id, which is the eos
    ],
)
def test_hf_clip_text_tower_must_fit_its_tokenizer(tmp_path, caplog, text, why):
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    write_clip_tokenizer(save_with_processor(tiny_clip_model(**text), tmp_path, processor))
    with caplog.at_level("WARNING"):
        backbone = make_backbone(hf_cfg(tmp_path))
    assert hasattr(backbone, "encode_text") == (not why)
    assert why in caplog.text


def test_hierarcaps_joint_metrics_run_on_hf_clip(clip_dirs, tmp_path):
    """evaluate.py backbone=reclip_vit_b32 dataset=hierarcaps, on the tiny CLIPModel."""
    from hsae.config import CacheConfig, DatasetConfig
    from hsae.evaluation import hierarchy_of_backbone

    dataset = DatasetConfig(name="hierarcaps", path=str(HIERARCAPS_IMAGES), max_images=6)
    metrics, path = hierarchy_of_backbone(
        hf_cfg(clip_dirs["joint"]), dataset, CacheConfig(), "val", tmp_path, "cpu"
    )
    assert path.is_file()
    assert -1 <= metrics["hier/kendall_tau"] <= 1
    assert 0 <= metrics["hier/retrieval_precision"] <= 1
    with pytest.raises(HsaeError, match="no text tower"):
        hierarchy_of_backbone(
            hf_cfg(clip_dirs["base"]), dataset, CacheConfig(), "val", tmp_path, "cpu"
        )


def test_spliced_zero_shot_runs_on_hf_clip(clip_dirs):
    from hsae.evaluation.control import spliced_zero_shot

    backbone = make_backbone(hf_cfg(clip_dirs["joint"]))
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    d = 32
    perfect, null = perfect_and_null_sae(d)
    names = ["dog", "cat", "truck"]
    good = spliced_zero_shot(backbone, perfect, 1, "cls", images, labels, names)
    bad = spliced_zero_shot(backbone, null, 1, "cls", images, labels, names)
    assert good["fidelity/zero_shot/spliced"] == good["fidelity/zero_shot/original"]
    assert bad["fidelity/zero_shot/spliced"] == bad["fidelity/zero_shot/ablated"]


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
        assert not hasattr(backbone, "encode_text")
    assert make_backbone(hf_cfg(vit_dir)).pre.resize_mode == "squash"


def test_hf_checkpoint_without_processor_uses_the_standard_one(tmp_path, caplog):
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(tmp_path / "bare")
    with caplog.at_level("WARNING"):
        backbone = make_backbone(hf_cfg(tmp_path / "bare"))
    assert "no preprocessor_config.json" in caplog.text
    assert "image tower only" not in caplog.text and not hasattr(backbone, "encode_text")
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
