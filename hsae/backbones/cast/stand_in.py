"""A small CAST for the study's stand-in backbones (``backbone.model_name: cast`` with
``loader: stand_in``), trained by hsae with exactly the flat stand-in ViT's recipe.

The stand-ins train on 32 px ``synthetic_tree`` images, augmented on the fly, so their
superpixels are computed per batch inside the encoder: ``kmeans_superpixels`` (SLIC's
k-means over colour and position, batched in torch) instead of scikit-image's SLIC per
image, computed at half resolution. The rest is hsae's CAST (``CastModel``): a conv stem of stride 4 (an 8 x 8 grid,
as the stand-in ViT's), superpixel tokens (a 6 x 6 grid of initial centres, about 30
non-empty at the stem's resolution), and four stages of one block each, pooling to
16 -> 8 -> 4 -> 2 segments.
"""

from __future__ import annotations

import torch
from torch import nn

from hsae.backbones.cast.model import CastArch, CastModel, CastOutput
from hsae.backbones.cast.superpixels import kmeans_superpixels


class CastStandIn(nn.Module):
    """The stand-in encoder contract (``hsae.backbones.stand_in.models``): normalised
    images -> the class-token embedding; ``hook_layers`` the transformer blocks."""

    def __init__(
        self,
        image_size: int = 32,
        d_model: int = 48,  # the ViT stand-in's width
        depths: tuple[int, ...] = (1, 1, 1, 1),
        n_heads: int = 4,
        num_clusters: tuple[int, ...] = (16, 8, 4, 2),
        mlp_ratio: float = 2.0,
        stem_stride: int = 4,
        superpixel_side: int = 6,  # superpixels start on a 6 x 6 grid
        compactness: float = 1.0,
    ):
        super().__init__()
        self.arch = CastArch(
            embed_dim=d_model,
            depths=tuple(depths),
            num_heads=n_heads,
            num_clusters=tuple(num_clusters),
            image_size=image_size,
            stem_stride=stem_stride,
            mlp_ratio=mlp_ratio,
            pool_heads=n_heads,
            pos_embed="learned",
            n_segments=superpixel_side**2,
        )
        self.cast = CastModel(self.arch)
        self.superpixel_side, self.compactness = superpixel_side, compactness
        self.embed_dim = d_model
        self.has_cls = True
        self.n_prefix_tokens = 1

    def hook_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"cast.{name}", block) for name, block in self.cast.blocks()]

    def forward_tree(self, images: torch.Tensor) -> CastOutput:
        """The whole output: embedding, superpixels on the stem grid, per-stage padding and
        assignments (``hsae.backbones.cast.segment_trees`` turns it into trees)."""
        # At half resolution: 4x cheaper, and the model samples the ids at its stem's
        # (coarser) grid anyway.
        small = torch.nn.functional.avg_pool2d(images, 2) if images.shape[-1] >= 32 else images
        segments = kmeans_superpixels(small, self.superpixel_side, compactness=self.compactness)
        return self.cast(images, segments)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tree(images).embedding_bd


def make_cast_stand_in(image_size: int = 32, **kwargs) -> nn.Module:
    for key in ("depths", "num_clusters"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return CastStandIn(image_size=image_size, **kwargs)
