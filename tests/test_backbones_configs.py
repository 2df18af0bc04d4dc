"""Every ``conf/backbone`` config composes and its adapter, built at full size with random
weights (no downloads), lists layers that agree with the config's layer, width and tokens.

Full-size models take a minute on two cores, so these are marked slow; the loaders
themselves are tested on tiny models in test_backbones_adapters.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hsae.backbones import make_backbone
from hsae.config import RunConfig, to_objects
from tests.conftest import CONF_DIR

CONFIGS = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))

# (hookable layers, tokens at the config's layer) of each config's real architecture.
EXPECTED = {
    "tiny_vit": (4, 65),
    "clip_vit_b32": (12, 50),
    "clip_vit_b16": (12, 197),
    "clip_vit_l14": (24, 257),
    "reclip_vit_b32": (12, 50),
    "reclip_vit_l14": (24, 257),
    "dinov2_vit_b14": (12, 257),
    "timm_vit_b16": (12, 197),
    "timm_deit_s16": (12, 197),
    "timm_resnet50": (5, 49),
    "torchvision_resnet50": (5, 49),
    "torchvision_alexnet": (7, 169),
    "cast_s_moco": (11, 17),  # stage-4 block: 16 segment tokens + CLS
    "cast_b_moco": (11, 17),
    "cast_s_deit": (11, 17),
    "vit_s_moco": (12, 197),
    "deit_s": (12, 197),
    "stand_in_flat": (2, 17),  # conv-stem ViT: 4x4 tokens + CLS at 32 px
    "stand_in_hier": (2, 17),
    "stand_in_cast": (4, 5),  # small CAST, 4 stages; stage-4 block: 4 segment tokens + CLS
}


def hf_architecture(model_name: str, folder: Path) -> Path:
    """A random model with the published architecture of ``model_name``, saved locally."""
    transformers = pytest.importorskip("transformers")
    if model_name.startswith("malper/hierarcaps-clip"):  # OpenAI CLIP ViT-B/32 and ViT-L/14
        large = model_name.endswith("-l")
        vision = transformers.CLIPVisionConfig(
            hidden_size=1024 if large else 768,
            intermediate_size=4096 if large else 3072,
            num_hidden_layers=24 if large else 12,
            num_attention_heads=16 if large else 12,
            patch_size=14 if large else 32,
            image_size=224,
        )
        model = transformers.CLIPVisionModel(vision)
        processor = transformers.CLIPImageProcessor()
    elif model_name == "facebook/dinov2-base":
        model = transformers.Dinov2Model(transformers.Dinov2Config(image_size=518, patch_size=14))
        processor = transformers.BitImageProcessor(
            size={"shortest_edge": 256},
            crop_size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    else:
        raise AssertionError(f"no architecture for {model_name}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_every_config_is_listed():
    assert set(CONFIGS) == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_agrees_with_its_architecture(compose, tmp_path, monkeypatch, name):
    cfg = to_objects(compose([f"backbone={name}"]), RunConfig).backbone
    assert cfg.name == name
    if cfg.loader == "hf":
        cfg = replace(cfg, model_name=str(hf_architecture(cfg.model_name, tmp_path / "m")))
    elif cfg.loader == "stand_in":  # its real architecture, trained for one step, stored in tmp
        monkeypatch.setenv("HSAE_HOME", str(tmp_path / "home"))
        cfg = replace(cfg, recipe={**cfg.recipe, "steps": 1, "n_train": 128, "n_val": 54})
    else:
        cfg = replace(cfg, pretrained=None)  # random weights: no downloads
    backbone = make_backbone(cfg)  # checks layer range, d_model and cls vs the model
    n_layers, n_tokens = EXPECTED[name]
    layers = backbone.layers()
    assert len(layers) == n_layers
    assert layers[cfg.layer].n_tokens == n_tokens
    assert layers[cfg.layer].d_model == cfg.d_model
