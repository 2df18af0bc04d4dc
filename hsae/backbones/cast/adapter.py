"""CAST behind hsae's backbone interface, and the ViT partners of the authors' pairs.

``model_name`` for ``loader: cast`` is ``<variant>[.<recipe>][+<superpixels>]``:

- variant: ``cast_small`` (CAST-S), ``cast_small_deep`` (CAST-SD), ``cast_base`` (CAST-B),
  ``cast_base_deep``, or hsae's ``cast_tiny``; any other name is a timm ViT
  (``vit_small_patch16_224``), the authors' ViT baseline, loaded from their checkpoint;
- recipe: ``moco`` (default; fixed sin-cos position embeddings, MoCo-v3's preprocessing:
  shorter side 256 bilinear, centre crop 224) or ``deit`` (learned position embeddings,
  DeiT's preprocessing: bicubic);
- superpixels: ``auto`` (default: SEEDS when OpenCV contrib is installed, else SLIC),
  ``slic`` or ``seeds``.

Layers are the transformer blocks of all stages in order (CAST-S: 3 + 3 + 3 + 2 = 11).
A stage-k block's tokens are the class token and that stage's segment tokens: superpixels
in stage 1 (their number differs between images), cluster centres after. Token choices:
``cls``, ``mean`` (over the image's segment tokens) and ``segments`` (one row per segment
token of each image; the cache stores the row -> (image, segment) index and each image's
segment tree). ``patch`` and ``all`` do not exist for CAST.

Superpixels are computed by ``resize_crop``, which the cache builder runs in its
DataLoader workers: CAST's model input is ``[4, H, W]``, RGB plus the superpixel id of
each pixel (exact in float32), and ``normalize`` leaves the id channel alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn

from hsae.backbones.base import POOLED_TOKEN, Backbone, LayerInfo, Preprocess
from hsae.backbones.cast.checkpoint import map_state_dict, map_vit_state_dict, read_checkpoint
from hsae.backbones.cast.model import VARIANTS, CastArch, CastModel, CastOutput
from hsae.backbones.cast.superpixels import METHODS, resolve_method, superpixels
from hsae.errors import HsaeError

log = logging.getLogger(__name__)

RECIPES = ("moco", "deit")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
CAST_TOKENS = ("cls", "mean", "segments")


class ModelName(NamedTuple):
    arch: str
    recipe: str
    superpixels: str


def parse_model_name(model_name: str) -> ModelName:
    name, _, method = model_name.partition("+")
    arch, _, recipe = name.partition(".")
    recipe = recipe or "moco"
    method = method or "auto"
    if recipe not in RECIPES:
        raise HsaeError(
            f"backbone.model_name={model_name!r}: recipe {recipe!r} is not one of {RECIPES} "
            "(e.g. cast_small.moco, cast_small.deit, vit_small_patch16_224.moco)"
        )
    if method not in METHODS:
        raise HsaeError(
            f"backbone.model_name={model_name!r}: superpixels {method!r} is not one of {METHODS}"
        )
    return ModelName(arch, recipe, method)


def _preprocess(size: int, recipe: str) -> Preprocess:
    # MoCo-v3's linear-probe evaluation: Resize(256) (bilinear), CenterCrop(224); DeiT's:
    # bicubic with crop_pct 0.875. hsae's small CAST sees its images whole.
    crop_pct = 0.875 if size >= 224 else 1.0
    interpolation = "bicubic" if recipe == "deit" else "bilinear"
    return Preprocess.crop_pct(size, crop_pct, interpolation, _IMAGENET_MEAN, _IMAGENET_STD)


class SegmentRows(NamedTuple):
    rows_nd: torch.Tensor  # one row per segment token
    image_n: torch.Tensor  # image of each row, within the batch
    token_n: torch.Tensor  # the row's token index within its stage (stage 1: superpixel id)


class SegmentTrees(NamedTuple):
    """Each image's part-whole tree: superpixels (stage-1 tokens) on the stem grid, and for
    every stage the next stage's token that each token is assigned to (argmax)."""

    segments_bhw: torch.Tensor  # int64 superpixel id of each stem-grid cell
    parents: list[torch.Tensor]  # per stage [b, s_k] int64, -1 for padded tokens
    confidence: list[torch.Tensor]  # per stage [b, s_k] the argmax's assignment weight


def segment_trees(out: CastOutput) -> SegmentTrees:
    parents, confidence = [], []
    for pad, assign in zip(out.padding, out.assignments, strict=True):
        weight, parent = assign.float().max(dim=-1)
        parents.append(torch.where(pad, -1, parent))
        confidence.append(torch.where(pad, 0.0, weight))
    return SegmentTrees(out.segments_bhw, parents, confidence)


class CastBackbone(Backbone):
    model: CastModel
    has_cls = True
    n_prefix_tokens = 1
    has_segment_tokens = True

    def __init__(
        self,
        name: str,
        model_name: str,
        pretrained: str | None,
        init_seed: int = 0,
        mask_padding: bool = True,
    ):
        self.name = name
        parsed = parse_model_name(model_name)
        if parsed.arch not in VARIANTS:
            raise HsaeError(
                f"backbone.model_name={model_name!r}: {parsed.arch!r} is not a CAST variant; "
                f"valid: {', '.join(VARIANTS)}"
            )
        base = VARIANTS[parsed.arch]
        pos = "learned" if parsed.recipe == "deit" else "sincos"
        self.arch = CastArch(**{**base.__dict__, "pos_embed": pos})
        self.superpixels = resolve_method(parsed.superpixels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model = CastModel(self.arch, mask_padding=mask_padding)
        if pretrained is not None:
            theirs, layout = read_checkpoint(pretrained)
            if layout != "plain" and layout != parsed.recipe:
                raise HsaeError(
                    f"{pretrained} is a {layout} checkpoint but backbone.model_name="
                    f"{model_name!r} says {parsed.recipe}; use {parsed.arch}.{layout}"
                )
            self.model.load_state_dict(map_state_dict(theirs, self.arch, self.model.state_dict()))
            log.info("loaded CAST weights from %s (%s layout)", pretrained, layout)
        self.model.eval().requires_grad_(False)
        self.pre = _preprocess(self.arch.image_size, parsed.recipe)
        self.last_output: CastOutput | None = None

    # ---- preprocessing: RGB + superpixel ids ----------------------------------------

    def resize_crop(self, image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
        rgb = super().resize_crop(image)
        ids = superpixels(rgb, self.arch.n_segments, self.superpixels)
        return torch.cat([rgb, ids[None].to(rgb.dtype)])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-3] != 4:
            raise HsaeError(
                f"CAST takes [4, H, W] inputs (RGB and superpixel ids) from its own "
                f"resize_crop/preprocess, got shape {tuple(images.shape)}"
            )
        rgb = super().normalize(images[..., :3, :, :])
        return torch.cat([rgb, images[..., 3:, :, :]], dim=-3)

    def preprocess_spec(self) -> dict:
        return {
            **super().preprocess_spec(),
            "superpixels": self.superpixels,
            "n_segments": self.arch.n_segments,
        }

    # ---- layers, forward, tokens ----------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        # Nominal token counts (stage 1 varies per image): from the architecture, since a
        # blank image has no superpixels to probe with.
        if self._layer_infos is None:
            counts = [self.arch.n_segments, *self.arch.num_clusters[:-1]]
            self._layer_infos = [
                LayerInfo(name, i, 1 + counts[int(name.split(".")[1])], self.arch.embed_dim)
                for i, (name, _) in enumerate(self._named_layers())
            ]
        return self._layer_infos

    def stage_of(self, layer: int) -> int:
        return int(self.check_layer(layer).name.split(".")[1])

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return list(self.model.blocks())

    def image_tower(self) -> nn.Module:
        return self.model

    def _run(self, images: torch.Tensor) -> None:
        if images.shape[1] != 4:
            raise HsaeError(
                "CAST needs superpixels: pass images through the backbone's preprocess "
                f"(RGB + superpixel ids, [B, 4, H, W]); got shape {tuple(images.shape)}"
            )
        rgb, ids = images[:, :3], images[:, 3].round().long()
        self.last_output = None
        self.last_output = self.model(rgb, ids)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> CastOutput:
        """The whole model on a preprocessed batch ``[B, 4, H, W]``."""
        self._run(images)
        assert self.last_output is not None
        return self.last_output

    def segment_tree_forward(self) -> Callable[[torch.Tensor], CastOutput]:
        return self.forward

    @torch.no_grad()
    def capture(self, images: torch.Tensor, layers) -> dict[int, torch.Tensor]:
        """As ``Backbone.capture``; stage-1 positions of empty (padded) superpixels are NaN,
        so ``select`` can tell an image's own segments from the batch's padding."""
        captured = super().capture(images, layers)
        pad = self._stage1_padding(images)
        for layer, acts in captured.items():
            if self.stage_of(layer) == 0:
                acts[:, 1:][pad[:, : acts.shape[1] - 1]] = float("nan")
        return captured

    def _stage1_padding(self, images: torch.Tensor) -> torch.Tensor:
        # Which superpixel ids are empty at the stem's resolution: what the model computes.
        grid = self.arch.grid
        ids = torch.nn.functional.interpolate(images[:, 3:4].float(), size=(grid, grid))
        ids = ids[:, 0].round().long().flatten(1)
        n = int(ids.max()) + 1
        counts = torch.zeros(len(ids), n, device=ids.device).scatter_add_(
            1, ids, torch.ones_like(ids, dtype=torch.float)
        )
        return counts == 0

    def select(self, acts_btd: torch.Tensor, tokens: str):
        token_index = self.token_index(acts_btd.shape[1], tokens)  # checks ``tokens``
        if tokens == "cls":
            return acts_btd[:, 0], token_index
        return acts_btd[:, 1:].nanmean(dim=1), token_index  # mean

    def token_index(self, n_tokens: int, tokens: str) -> torch.Tensor:
        if tokens == "cls":
            return torch.tensor([0])
        if tokens == "mean":
            return torch.tensor([POOLED_TOKEN])
        raise HsaeError(
            f"backbone.tokens={tokens!r} for CAST: valid are {', '.join(CAST_TOKENS)} "
            "(segments: one row per segment token, a different number per image)"
        )

    def select_segments(self, acts_btd: torch.Tensor) -> SegmentRows:
        """One row per real segment token of each image (padded positions dropped)."""
        tokens = acts_btd[:, 1:]
        keep_bs = torch.isfinite(tokens).all(dim=-1)
        image_n, token_n = keep_bs.nonzero(as_tuple=True)
        return SegmentRows(tokens[keep_bs], image_n, token_n)

    @torch.no_grad()
    def capture_segments(
        self, images: torch.Tensor, layer: int
    ) -> tuple[SegmentRows, SegmentTrees]:
        """Segment rows of one layer and each image's whole segment tree, in one full pass
        (the tree needs every stage's pooling, so the pass does not stop at the layer)."""
        module = self.model.get_submodule(self.check_layer(layer).name)
        got: list[torch.Tensor] = []

        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            got.append(output.clone())

        handle = module.register_forward_hook(hook)
        try:
            self._run(images)
        finally:
            handle.remove()
        assert self.last_output is not None
        acts = got[0]
        if self.stage_of(layer) == 0:
            acts[:, 1:][self.last_output.padding[0]] = float("nan")
        return self.select_segments(acts), segment_trees(self.last_output)


def make_authors_vit(
    name: str, model_name: str, pretrained: str | None, init_seed: int = 0
) -> Backbone:
    """A timm ViT loaded from the CAST authors' MoCo-v3 checkpoint (``.moco``) or a DeiT
    one (``.deit``): the flat partner of a controlled pair. The head is removed, so the
    tower's output is the class token's embedding."""
    from hsae.backbones.timm import TimmBackbone

    parsed = parse_model_name(model_name)
    backbone = TimmBackbone(name, parsed.arch, None, init_seed)
    model: Any = backbone.model  # a timm VisionTransformer
    model.reset_classifier(0)
    if pretrained is not None:
        theirs, _ = read_checkpoint(pretrained)
        state = map_vit_state_dict(theirs, backbone.model.state_dict())
        backbone.model.load_state_dict(state)
        log.info("loaded ViT weights from %s", pretrained)
    if parsed.recipe == "moco":
        backbone.pre = _preprocess(backbone.pre.size[0], "moco")
    return backbone


def make_cast_loader_backbone(
    name: str, model_name: str, pretrained: str | None, init_seed: int = 0
) -> Backbone:
    """``loader: cast``: a CAST variant, or (any other name) a timm ViT partner."""
    if parse_model_name(model_name).arch in VARIANTS:
        return CastBackbone(name, model_name, pretrained, init_seed)
    return make_authors_vit(name, model_name, pretrained, init_seed)
