"""Vision backbones behind one adapter interface (``Backbone``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hsae.backbones.base import POOLED_TOKEN, Backbone, LayerInfo, select_tokens
from hsae.errors import HsaeError

if TYPE_CHECKING:
    from hsae.config import BackboneConfig

__all__ = ["POOLED_TOKEN", "Backbone", "LayerInfo", "make_backbone", "select_tokens"]


def make_backbone(cfg: BackboneConfig) -> Backbone:
    """Load the backbone and check the config's layer and width against it."""
    if cfg.loader == "open_clip":
        from hsae.backbones.open_clip import OpenClipBackbone

        backbone: Backbone = OpenClipBackbone(
            cfg.name, cfg.model_name, cfg.pretrained, cfg.init_seed
        )
    else:
        raise HsaeError(f"backbone.loader={cfg.loader!r} is not known; valid: open_clip")
    info = backbone.check_layer(cfg.layer)
    if info.d_model != cfg.d_model:
        raise HsaeError(
            f"backbone.d_model={cfg.d_model} but layer {cfg.layer} of {cfg.name} has width "
            f"{info.d_model}; set backbone.d_model={info.d_model}"
        )
    return backbone
