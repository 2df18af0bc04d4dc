"""timm image models: ViT / DeiT (transformer blocks) and CNNs such as ResNet (stages).

``model_name`` is a timm name, optionally with its pretrained tag, e.g.
``vit_base_patch16_224.augreg_in21k_ft_in1k``, ``deit_small_patch16_224.fb_in1k`` or
``resnet50.a1_in1k``; the tag also fixes the preprocessing (timm's ``pretrained_cfg``).
``pretrained``: None = random weights seeded by ``init_seed``; ``hub`` = the tag's weights
through timm (Hugging Face hub cache); or a local checkpoint file.

Layers are the modules timm lists in ``model.feature_info``: every block of a ViT, the
stem and the four stages of a ResNet. A CNN layer's tokens are the spatial positions of
its feature map (no CLS token; ``tokens=mean`` is global average pooling).
"""

from __future__ import annotations

from pathlib import Path

import timm
import timm.data
import torch
from torch import nn

from hsae.backbones.base import Preprocess, WholeModelBackbone
from hsae.errors import HsaeError


def _create_model(model_name: str, pretrained: str | None, init_seed: int) -> nn.Module:
    architecture = model_name.split(".")[0]
    if not timm.list_models(architecture):
        raise HsaeError(
            f"backbone.model_name={model_name!r} is not a timm model; see timm.list_models(), "
            "e.g. vit_base_patch16_224.augreg_in21k_ft_in1k, deit_small_patch16_224, resnet50"
        )
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return timm.create_model(model_name, pretrained=False)
    if pretrained == "hub":
        try:
            return timm.create_model(model_name, pretrained=True)
        except Exception as e:
            raise HsaeError(
                f"could not load timm weights for {model_name!r}: {e}. Fix: download them once "
                "on a machine with internet access (they land in the Hugging Face cache) or set "
                "backbone.pretrained to a local checkpoint file"
            ) from e
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise HsaeError(
            f"backbone.pretrained={pretrained!r} for timm is neither 'hub', null (random "
            "weights) nor an existing checkpoint file"
        )
    try:
        return timm.create_model(model_name, pretrained=False, checkpoint_path=str(path))
    except Exception as e:
        raise HsaeError(
            f"could not load the checkpoint {path} into timm {model_name!r}: {e}"
        ) from e


class TimmBackbone(WholeModelBackbone):
    def __init__(self, name: str, model_name: str, pretrained: str | None, init_seed: int = 0):
        self.name = name
        self.model = _create_model(model_name, pretrained, init_seed).eval()
        self.model.requires_grad_(False)
        feature_info = getattr(self.model, "feature_info", None)
        if not feature_info:
            raise HsaeError(
                f"timm model {model_name!r} lists no feature_info, so hsae cannot tell its "
                "layers; use a ViT, DeiT or ResNet-style model"
            )
        self._layer_names = [info["module"] for info in feature_info]
        self._channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        cls_token = getattr(self.model, "cls_token", None)
        self.has_cls = cls_token is not None
        self.n_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", int(self.has_cls)))
        data_cfg = timm.data.resolve_model_data_config(self.model)
        if data_cfg.get("crop_mode", "center") != "center":
            raise HsaeError(
                f"timm model {model_name!r} uses crop_mode={data_cfg['crop_mode']!r}; hsae "
                "supports centre crops"
            )
        self.pre = Preprocess.crop_pct(
            data_cfg["input_size"][-1],
            data_cfg.get("crop_pct", 1.0),
            data_cfg.get("interpolation", "bicubic"),
            data_cfg["mean"],
            data_cfg["std"],
        )

    def _to_tokens(self, acts: torch.Tensor) -> torch.Tensor:
        if acts.ndim == 4 and self._channels_last:  # e.g. Swin: [B, H, W, C]
            return acts.flatten(1, 2)
        return super()._to_tokens(acts)
