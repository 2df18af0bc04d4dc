"""open_clip vision towers (CLIP ViTs and hsae's own small configs).

``model_name`` is any open_clip model config, including the ones shipped in
``hsae/backbones/model_configs`` (e.g. ``hsae-tiny-vit``); ``pretrained`` is an open_clip
tag from ``open_clip.list_pretrained()``, a local checkpoint path, or None for random
weights seeded by ``init_seed``.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from hsae.backbones.base import Backbone, LayerInfo
from hsae.errors import HsaeError

log = logging.getLogger(__name__)
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


@cache
def _register_model_configs() -> None:
    open_clip.add_model_config(MODEL_CONFIG_DIR)


def _create_model(model_name: str, pretrained: str | None, init_seed: int) -> nn.Module:
    _register_model_configs()
    if model_name not in open_clip.list_models():
        raise HsaeError(
            f"backbone.model_name={model_name!r} is not an open_clip model; "
            f"see open_clip.list_models(), e.g. ViT-B-32, ViT-B-16, ViT-L-14, hsae-tiny-vit"
        )
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return open_clip.create_model(model_name, pretrained=None)
    is_path = Path(pretrained).expanduser().exists()
    try:
        return open_clip.create_model(
            model_name, pretrained=str(Path(pretrained).expanduser()) if is_path else pretrained
        )
    except Exception as e:
        how = (
            "check that the file is an open_clip checkpoint for this model_name"
            if is_path
            else "download the weights once on a machine with internet access (they land in "
            "the Hugging Face cache) or set backbone.pretrained to a local checkpoint path"
        )
        raise HsaeError(
            f"could not load open_clip {model_name} with pretrained={pretrained!r}: {e}. Fix: {how}"
        ) from e


class OpenClipBackbone(Backbone):
    def __init__(self, name: str, model_name: str, pretrained: str | None, init_seed: int = 0):
        self.name = name
        self.model = _create_model(model_name, pretrained, init_seed).eval()
        self.model.requires_grad_(False)
        visual = self.model.visual
        if not hasattr(visual, "transformer"):
            raise HsaeError(
                f"backbone.model_name={model_name!r} has no ViT image tower (e.g. a ResNet or "
                "ConvNeXt CLIP); hsae's open_clip adapter hooks ViT blocks"
            )
        self.has_cls = getattr(visual, "class_embedding", None) is not None
        cfg = visual.preprocess_cfg
        self.image_size = (
            tuple(cfg["size"])
            if isinstance(cfg["size"], (tuple, list))
            else (
                cfg["size"],
                cfg["size"],
            )
        )
        self.mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(3, 1, 1)

    def image_tower(self) -> nn.Module:
        return self.model.visual

    def _hook_modules(self) -> list[nn.Module]:
        return list(self.model.visual.transformer.resblocks)

    def layers(self) -> list[LayerInfo]:
        visual = self.model.visual
        n_tokens = visual.grid_size[0] * visual.grid_size[1] + int(self.has_cls)
        return [
            LayerInfo(f"visual.transformer.resblocks.{i}", i, n_tokens, visual.transformer.width)
            for i in range(len(visual.transformer.resblocks))
        ]

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        # open_clip's own transform expects PIL images; this is its tensor equivalent:
        # resize the shorter side (bicubic), centre crop, normalise.
        h, w = self.image_size
        if tuple(image.shape[-2:]) != (h, w):
            scale = max(h / image.shape[-2], w / image.shape[-1])
            size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
            image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True)[0]
            top, left = (size[0] - h) // 2, (size[1] - w) // 2
            image = image[:, top : top + h, left : left + w].clamp(0, 1)
        return (image - self.mean) / self.std

    def preprocess_spec(self) -> dict:
        return {
            "size": list(self.image_size),
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "resize": "shortest-bicubic-centre-crop",
        }

    def _run(self, images: torch.Tensor) -> None:
        self.model.visual(images)

    def _to_batch_first(self, acts: torch.Tensor) -> torch.Tensor:
        return acts if self.model.visual.transformer.batch_first else acts.transpose(0, 1)
