"""Architectures of the stand-in backbones, by name (``backbone.model_name``).

Every architecture is an *encoder*: an ``nn.Module`` built by
``ARCHITECTURES[name](image_size=..., **arch_kwargs)`` that

- maps images ``[B, 3, S, S]`` (normalised) to an embedding ``[B, embed_dim]``, which the
  objective's linear heads read;
- lists its hookable layers, in forward order, with ``hook_layers() -> [(path, module)]``;
  each module's output is ``[B, tokens, d]`` (prefix tokens first);
- sets ``embed_dim``, ``has_cls`` and ``n_prefix_tokens``.

Other architectures (e.g. CAST, issue #14) register themselves with
``ARCHITECTURES["cast"] = make_cast`` and are then trained by the same recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hsae.errors import HsaeError


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise HsaeError(
                f"stand-in ViT: d_model={d_model} is not a multiple of n_heads={n_heads}"
            )
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        b, t, d = x_btd.shape
        q, k, v = self.qkv(x_btd).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block (as in ViT and CLIP)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))

    def forward(self, x_btd: torch.Tensor) -> torch.Tensor:
        x_btd = x_btd + self.attn(self.norm1(x_btd))
        return x_btd + self.mlp(self.norm2(x_btd))


class ConvStemViT(nn.Module):
    """A small ViT whose patchify layer is a stack of stride-2 3x3 convolutions followed by a
    1x1 projection (Xiao et al. 2021, "Early convolutions help transformers see better"):
    it trains faster and more robustly than a patchify stem, which matters for a backbone
    that must learn in seconds on a CPU. A CLS token and learned position embeddings; the
    embedding is the final-normed CLS token."""

    def __init__(
        self,
        image_size: int = 32,
        d_model: int = 48,
        depth: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 2.0,
        # Three halvings: 4x4 tokens at 32 px. A 8x8 grid learned no better per step and cost
        # three times as much (bench/stand_in_grid.py).
        stem_channels: tuple[int, ...] = (16, 32, 48),
    ):
        super().__init__()
        n_down = len(stem_channels)
        if image_size % 2**n_down:
            raise HsaeError(
                f"stand-in ViT: image_size={image_size} must be divisible by 2**{n_down} "
                f"(one halving per stem convolution, stem_channels={list(stem_channels)})"
            )
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in stem_channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, d_model, 1))
        self.stem = nn.Sequential(*layers)
        self.grid = image_size // 2**n_down
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.embed_dim = d_model
        self.has_cls = True
        self.n_prefix_tokens = 1

    def hook_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x_btd = self.stem(images).flatten(2).transpose(1, 2)
        x_btd = torch.cat([self.cls_token.expand(len(x_btd), -1, -1), x_btd], dim=1)
        x_btd = x_btd + self.pos_embed
        for block in self.blocks:
            x_btd = block(x_btd)
        return self.norm(x_btd[:, 0])


def make_vit(image_size: int = 32, **kwargs) -> nn.Module:
    if "stem_channels" in kwargs:
        kwargs["stem_channels"] = tuple(kwargs["stem_channels"])
    return ConvStemViT(image_size=image_size, **kwargs)


def make_cast(image_size: int = 32, **kwargs) -> nn.Module:
    # CAST lives in its own package (issue #14); imported only when a CAST stand-in is built.
    from hsae.backbones.cast.stand_in import make_cast_stand_in

    return make_cast_stand_in(image_size=image_size, **kwargs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"vit": make_vit, "cast": make_cast}


class StandIn(nn.Module):
    """An encoder plus one linear head per hierarchy level (coarse to fine). Both objectives
    build the same module; the flat one trains only the leaf head."""

    # ``encoder``: an nn.Module with the encoder contract of this module's docstring (typed
    # Any: the contract is attributes nn.Module does not declare).
    def __init__(self, encoder: Any, n_classes_per_level: list[int]):
        super().__init__()
        self.encoder: Any = encoder
        self.heads = nn.ModuleList(nn.Linear(encoder.embed_dim, n) for n in n_classes_per_level)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(embedding [B, e], logits per level [[B, n_classes(l)], ...])``."""
        emb = self.encoder(images)
        return emb, [head(emb) for head in self.heads]


def make_stand_in(
    arch: str, image_size: int, n_classes_per_level: list[int], arch_kwargs: dict
) -> StandIn:
    if arch not in ARCHITECTURES:
        raise HsaeError(
            f"backbone.model_name={arch!r} is not a stand-in architecture; valid: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return StandIn(ARCHITECTURES[arch](image_size=image_size, **arch_kwargs), n_classes_per_level)
