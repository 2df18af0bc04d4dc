"""CAST (Ke, Mo & Yu, ICLR 2024): a ViT on superpixel tokens with graph pooling.

Written for hsae from the paper and the authors' description. An image's convolutional
stem features (stride 8) are averaged over each superpixel, and so are the position
embeddings, giving one token per superpixel plus a class token. Four stages of
transformer blocks follow; after each stage a graph pooling module picks cluster centres
among the tokens by farthest-point sampling, softly assigns every token to the centres by
scaled cosine similarity, and replaces the tokens by the assignment-weighted means (plus
each centre's own token as a residual). Token counts shrink stage by stage, e.g. about
196 superpixels -> 64 -> 32 -> 16 -> 8, and the argmax of each assignment gives each
image a part-whole segment tree.

Padding: images of a batch have different numbers of superpixels, and a superpixel too
small to cover a stem cell has no pixel at the stem's resolution. Token tensors are padded
to the batch's largest segment id + 1. With ``mask_padding`` (the default) padded tokens
are left out of attention, of the token means and of pooling, so an image's activations do
not depend on the rest of its batch. The authors' code lets the padded (zero) tokens take
part in attention and pooling; ``mask_padding=False`` reproduces that.

Shape letters: ``b`` images, ``s`` tokens of a stage, ``c`` cluster centres, ``d`` width.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hsae.backbones.cast.ops import farthest_point_sampling, segment_mean
from hsae.errors import HsaeError


@dataclass(frozen=True)
class CastArch:
    embed_dim: int
    depths: tuple[int, ...]  # blocks per stage
    num_heads: int
    num_clusters: tuple[int, ...]  # tokens after each stage's pooling
    image_size: int = 224
    stem_stride: int = 8  # the conv stem's total stride (the authors' "patch_size")
    mlp_ratio: float = 4.0
    pool_heads: int = 12  # heads of the pooling's attention layer (the authors' default)
    pos_embed: str = "sincos"  # sincos: fixed (MoCo-v3 runs) | learned (DeiT runs)
    n_segments: int = 196  # superpixels asked of SLIC/SEEDS per image

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.num_clusters):
            raise HsaeError(
                f"CAST needs one cluster count per stage: depths={self.depths}, "
                f"num_clusters={self.num_clusters}"
            )
        if self.stem_stride not in (1, 2, 4, 8) or self.image_size % self.stem_stride:
            raise HsaeError(
                f"stem_stride={self.stem_stride} must be 1, 2, 4 or 8 and divide "
                f"image_size={self.image_size}"
            )
        if self.pos_embed not in ("sincos", "learned"):
            raise HsaeError(f"pos_embed={self.pos_embed!r}: use sincos or learned")
        if self.embed_dim % 8 or self.embed_dim % self.num_heads:
            raise HsaeError(
                f"embed_dim={self.embed_dim} must be divisible by 8 (conv stem) and by "
                f"num_heads={self.num_heads}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.stem_stride


# The authors' variants (cast_models/cast.py): S and B differ in width, "deep" (SD) in the
# first stage's depth. All use a stride-8 conv stem at 224 px (a 28 x 28 grid).
VARIANTS: dict[str, CastArch] = {
    "cast_small": CastArch(384, (3, 3, 3, 2), 12, (64, 32, 16, 8)),
    "cast_small_deep": CastArch(384, (6, 3, 3, 3), 12, (64, 32, 16, 8)),
    "cast_base": CastArch(768, (3, 3, 3, 2), 12, (64, 32, 16, 8)),
    "cast_base_deep": CastArch(768, (6, 3, 3, 3), 12, (64, 32, 16, 8)),
    # hsae's own small CAST (64 px, 8 x 8 stem grid, ~32 superpixels -> 16 -> 8 -> 4 -> 2):
    # tests and the study's stand-in.
    "cast_tiny": CastArch(
        128, (1, 1, 1, 1), 4, (16, 8, 4, 2), image_size=64, pool_heads=4, n_segments=32
    ),
}


class ConvStem(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (strides 2, 2, 2, 1 for a total stride of 8; fewer
    stride-2 layers for smaller strides; width d/8 doubling) and a 1x1 projection to ``d``
    (Xiao et al., "Early convolutions help transformers see better")."""

    def __init__(self, embed_dim: int, stride: int = 8):
        super().__init__()
        n_down = {1: 0, 2: 1, 4: 2, 8: 3}[stride]
        layers: list[nn.Module] = []
        c_in, c_out = 3, embed_dim // 8
        for i in range(4):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2 if i < n_down else 1, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(images))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_bsd: torch.Tensor, ignore_bs: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x_bsd.shape
        q, k, v = self.qkv(x_bsd).view(b, s, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attend = None if ignore_bs is None else ~ignore_bs[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block (the ViT block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x_bsd: torch.Tensor, ignore_bs: torch.Tensor | None = None) -> torch.Tensor:
        x_bsd = x_bsd + self.attn(self.norm1(x_bsd), ignore_bs)
        return x_bsd + self.mlp(self.norm2(x_bsd))


def _masked_mean(x_bsd: torch.Tensor, pad_bs: torch.Tensor | None) -> torch.Tensor:
    if pad_bs is None:
        return x_bsd.mean(dim=1, keepdim=True)
    keep = (~pad_bs).to(x_bsd.dtype)[..., None]
    return (x_bsd * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp(min=1)


class CentroidBlock(nn.Module):
    """The pooling's feature layer: attention without an MLP, then the token mean is
    replaced by a learned bias (the authors' graph-pooling block)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.bias = nn.Parameter(torch.zeros(dim).normal_(0, 1e-2))

    def forward(self, x_bsd: torch.Tensor, pad_bs: torch.Tensor | None) -> torch.Tensor:
        x_bsd = x_bsd + self.attn(self.norm(x_bsd), pad_bs)
        return x_bsd - _masked_mean(x_bsd, pad_bs) + self.bias


class PoolOutput(NamedTuple):
    cls_b1d: torch.Tensor  # the class token, updated
    tokens_bcd: torch.Tensor  # one token per cluster centre
    logits_bsc: torch.Tensor  # scaled cosine similarity of each token to each centre
    assign_bsc: torch.Tensor  # softmax over centres (rows of padded tokens are zero when masked)
    centres_bc: torch.Tensor  # index of each centre among the input tokens


class GraphPool(nn.Module):
    def __init__(self, dim: int, n_clusters: int, num_heads: int, scale: float = 5.0):
        super().__init__()
        self.n_clusters = n_clusters
        self.scale = scale  # cosine similarities in [-1, 1] times 5 (the authors' value)
        self.centroid_block = CentroidBlock(dim, num_heads)
        self.fc1 = nn.Sequential(
            OrderedDict(
                norm=nn.LayerNorm(dim),
                linear=nn.Linear(dim, dim * 4),
                act=nn.GELU(),
                drop=nn.Dropout(0.1),
            )
        )
        self.fc2 = nn.Sequential(
            OrderedDict(norm=nn.LayerNorm(dim * 4), linear=nn.Linear(dim * 4, dim))
        )

    def forward(
        self, cls_b1d: torch.Tensor, x_bsd: torch.Tensor, pad_bs: torch.Tensor, masked: bool
    ) -> PoolOutput:
        b, _, d = x_bsd.shape
        # Farthest-point sampling over [token mean, tokens], starting at the mean (the
        # authors' scheme, in float64 as theirs). Padded tokens, which the authors set to
        # the mean, and the mean itself are excluded, so an image with fewer real tokens
        # than centres repeats real tokens instead of choosing padding.
        mean_b1d = _masked_mean(x_bsd, pad_bs)
        filled = torch.where(pad_bs[..., None], mean_b1d, x_bsd)
        points = torch.cat([mean_b1d, filled], dim=1).double()
        exclude = torch.cat([pad_bs.new_ones(b, 1), pad_bs], dim=1)
        centres_bc = farthest_point_sampling(points, self.n_clusters + 1, 0, exclude)[:, 1:] - 1
        gather = centres_bc[..., None].expand(-1, -1, d)

        nodes_bsd = self.centroid_block(x_bsd, pad_bs if masked else None)
        centre_feats = torch.gather(nodes_bsd, 1, gather)
        logits_bsc = self.scale * torch.einsum(
            "bsd,bcd->bsc", F.normalize(nodes_bsd, dim=-1), F.normalize(centre_feats, dim=-1)
        )
        assign_bsc = logits_bsc.softmax(dim=-1)
        if masked:
            assign_bsc = assign_bsc * (~pad_bs)[..., None].to(assign_bsc.dtype)

        h = self.fc1(torch.cat([cls_b1d, x_bsd], dim=1))
        h_cls, h_tokens = h[:, :1], h[:, 1:]
        weight_bcs = assign_bsc.transpose(1, 2)
        pooled = (weight_bcs @ h_tokens) / weight_bcs.sum(-1, keepdim=True)
        out = self.fc2(torch.cat([h_cls, pooled], dim=1))
        tokens_bcd = out[:, 1:] + torch.gather(x_bsd, 1, gather)
        return PoolOutput(out[:, :1] + cls_b1d, tokens_bcd, logits_bsc, assign_bsc, centres_bc)


class Stage(nn.Module):
    blocks: nn.ModuleList
    pool: GraphPool

    def __init__(self, arch: CastArch, depth: int, n_clusters: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(arch.embed_dim, arch.num_heads, arch.mlp_ratio) for _ in range(depth)
        )
        self.pool = GraphPool(arch.embed_dim, n_clusters, arch.pool_heads)


class CastOutput(NamedTuple):
    embedding_bd: torch.Tensor  # the normalised class token after the last stage
    segments_bhw: torch.Tensor  # superpixel id of each stem-grid cell (= stage-1 token index)
    padding: list[torch.Tensor]  # per stage [b, s]: True for empty (padded) tokens
    assignments: list[torch.Tensor]  # per stage [b, s, c]: soft assignment to the next stage


def sincos_grid(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``[1, grid*grid, dim]`` (MoCo-v3's): for the
    cell at (row r, column c), [sin(r w), cos(r w), sin(c w), cos(c w)] over dim/4 freqs."""
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    r = rows.reshape(-1, 1) * omega
    c = cols.reshape(-1, 1) * omega
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)[None]


class CastModel(nn.Module):
    def __init__(self, arch: CastArch, mask_padding: bool = True):
        super().__init__()
        self.arch, self.mask_padding = arch, mask_padding
        d = arch.embed_dim
        self.stem = ConvStem(d, arch.stem_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.grid**2, d))
        self.stages = nn.ModuleList(
            Stage(arch, depth, c) for depth, c in zip(arch.depths, arch.num_clusters, strict=True)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        # The MoCo-v3 ViT initialisation the authors use: xavier-uniform linears with q, k,
        # v treated as three matrices, zero biases, a near-zero class token.
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan_out = module.weight.shape[0] // 3 if name.endswith("qkv") else None
                if fan_out is not None:
                    bound = math.sqrt(6.0 / (fan_out + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        with torch.no_grad():
            if self.arch.pos_embed == "sincos":
                self.pos_embed.copy_(sincos_grid(self.arch.grid, self.arch.embed_dim))
                self.pos_embed.requires_grad_(False)
                self.cls_pos.requires_grad_(False)
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
                nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def _stages(self) -> list[Stage]:
        return [stage for stage in self.stages if isinstance(stage, Stage)]

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Every transformer block in forward order, with its module path."""
        return [
            (f"stages.{k}.blocks.{j}", block)
            for k, stage in enumerate(self._stages())
            for j, block in enumerate(stage.blocks)
        ]

    def forward(self, images_b3hw: torch.Tensor, segments_bhw: torch.Tensor) -> CastOutput:
        feats = self.stem(images_b3hw)
        b, _, gh, gw = feats.shape
        if gh * gw != self.pos_embed.shape[1]:
            raise HsaeError(
                f"CAST built for {self.arch.image_size} px images got {tuple(images_b3hw.shape)}; "
                f"resize images to {self.arch.image_size} x {self.arch.image_size}"
            )
        # Superpixels at the stem's resolution, sampled as the authors do (nearest).
        labels = F.interpolate(segments_bhw[:, None].float(), size=(gh, gw), mode="nearest")
        labels_bhw = labels[:, 0].long()
        labels_bn = labels_bhw.flatten(1)
        n_seg = int(labels_bn.max()) + 1
        x, counts = segment_mean(feats.flatten(2).transpose(1, 2), labels_bn, n_seg)
        pos, _ = segment_mean(self.pos_embed.expand(b, -1, -1).to(x.dtype), labels_bn, n_seg)
        x = x + pos
        pad = counts == 0
        cls = (self.cls_token + self.cls_pos).expand(b, -1, -1).to(x.dtype)

        paddings, assignments = [], []
        h = x
        for stage in self._stages():
            h = torch.cat([cls, x], dim=1)
            ignore = torch.cat([pad.new_zeros(b, 1), pad], dim=1) if self.mask_padding else None
            for block in stage.blocks:
                h = block(h, ignore)
            pooled = stage.pool(h[:, :1], h[:, 1:], pad, self.mask_padding)
            paddings.append(pad)
            assignments.append(pooled.assign_bsc)
            cls, x = pooled.cls_b1d, pooled.tokens_bcd
            pad = pad.new_zeros(b, x.shape[1])
        # The output is the last stage's class token before its pooling (whose only use is
        # the top level of the segment tree), as in the authors' model.
        return CastOutput(self.norm(h)[:, 0], labels_bhw, paddings, assignments)
