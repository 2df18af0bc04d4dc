"""Vision backbones behind one adapter interface (``Backbone``).

Loaders (``backbone.loader``): ``open_clip``, ``hf`` (Hugging Face transformers: CLIP,
ViT, DINOv2), ``timm`` and ``torchvision``; each module imports its library only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsae.backbones.base import (
    POOLED_TOKEN,
    Backbone,
    LayerInfo,
    Preprocess,
    same_image_tower_warning,
    select_tokens,
)
from hsae.errors import HsaeError

if TYPE_CHECKING:
    from hsae.config import BackboneConfig

__all__ = [
    "POOLED_TOKEN",
    "Backbone",
    "LayerInfo",
    "Preprocess",
    "make_backbone",
    "same_image_tower_warning",
    "select_tokens",
]


def _load(cfg: BackboneConfig) -> Backbone:
    if cfg.loader == "open_clip":
        from hsae.backbones.open_clip import OpenClipBackbone

        return OpenClipBackbone(cfg.name, cfg.model_name, cfg.pretrained, cfg.init_seed)
    if cfg.loader == "hf":
        from hsae.backbones.hf import HFBackbone

        return HFBackbone(cfg.name, cfg.model_name, cfg.pretrained)
    if cfg.loader == "timm":
        from hsae.backbones.timm import TimmBackbone

        return TimmBackbone(cfg.name, cfg.model_name, cfg.pretrained, cfg.init_seed)
    if cfg.loader == "torchvision":
        from hsae.backbones.torchvision import TorchvisionBackbone

        return TorchvisionBackbone(cfg.name, cfg.model_name, cfg.pretrained, cfg.init_seed)
    if cfg.loader == "cast":
        from hsae.backbones.cast import make_cast_loader_backbone

        return make_cast_loader_backbone(cfg.name, cfg.model_name, cfg.pretrained, cfg.init_seed)
    if cfg.loader == "stand_in":
        from hsae.backbones.stand_in.adapter import StandInBackbone

        return StandInBackbone(cfg.name, cfg.model_name, cfg.pretrained, cfg.init_seed, cfg.recipe)
    raise HsaeError(
        f"backbone.loader={cfg.loader!r} is not known; valid: open_clip, hf, timm, torchvision, "
        "stand_in, "
        "cast"
    )


def make_backbone(cfg: BackboneConfig) -> Backbone:
    """Load the backbone and check the config's layer, width and token choice against it."""
    backbone = _load(cfg)
    info = backbone.check_layer(cfg.layer)
    if info.d_model != cfg.d_model:
        raise HsaeError(
            f"backbone.d_model={cfg.d_model} but layer {cfg.layer} ({info.name}) of {cfg.name} "
            f"has width {info.d_model}; set backbone.d_model={info.d_model}"
        )
    if cfg.tokens == "cls" and not backbone.has_cls:
        raise HsaeError(
            f"backbone.tokens=cls but {cfg.name} has no CLS token (a CNN's tokens are spatial "
            "positions); use backbone.tokens=mean (global average pool) or patch"
        )
    return backbone
