"""CAST (Ke, Mo & Yu, ICLR 2024) for hsae: the model (``model``), superpixels
(``superpixels``), the authors' checkpoints (``checkpoint``) and the backbone adapter
(``adapter``). ``docs/cast.md`` describes it all."""

from hsae.backbones.cast.adapter import (
    CastBackbone,
    SegmentRows,
    SegmentTrees,
    make_authors_vit,
    make_cast_loader_backbone,
    parse_model_name,
    segment_trees,
)
from hsae.backbones.cast.model import VARIANTS, CastArch, CastModel, CastOutput

__all__ = [
    "VARIANTS",
    "CastArch",
    "CastBackbone",
    "CastModel",
    "CastOutput",
    "SegmentRows",
    "SegmentTrees",
    "make_authors_vit",
    "make_cast_loader_backbone",
    "parse_model_name",
    "segment_trees",
]
