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
from typing import Any

import open_clip
import torch
from torch import nn

from hsae.backbones.base import Backbone, Preprocess
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


_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_CLIP_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}


def clip_canonical(visual_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """An open_clip CLIP ViT tower's tensors under Hugging Face ``CLIPVisionModel`` names
    and layout (fused q/k/v split in three; the output projection left out, as
    ``CLIPVisionModel`` has none), so that the same weights loaded by either library have
    one fingerprint. None when the tower has tensors a standard CLIP ViT lacks."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in visual_state.items():
        if key == "proj":
            continue
        if key in _CLIP_TOP:
            name = _CLIP_TOP[key]
            # open_clip keeps the position embedding as [tokens, d] like HF; conv1 matches.
            out[name] = tensor
            continue
        if not key.startswith("transformer.resblocks."):
            return None
        i, rest = key.removeprefix("transformer.resblocks.").split(".", 1)
        prefix = f"encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for part, chunk in zip(("q", "k", "v"), tensor.chunk(3), strict=True):
                out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk
            continue
        module, _, leaf = rest.rpartition(".")
        if module not in _CLIP_BLOCK:
            return None
        out[f"{prefix}{_CLIP_BLOCK[module]}.{leaf}"] = tensor
    return out


class OpenClipBackbone(Backbone):
    def __init__(self, name: str, model_name: str, pretrained: str | None, init_seed: int = 0):
        self.name, self.model_name = name, model_name
        self.model = _create_model(model_name, pretrained, init_seed).eval()
        self.model.requires_grad_(False)
        visual = self.visual
        if not hasattr(visual, "transformer"):
            raise HsaeError(
                f"backbone.model_name={model_name!r} has no ViT image tower (e.g. a ResNet or "
                "ConvNeXt CLIP); hsae's open_clip adapter hooks ViT blocks"
            )
        self.has_cls = getattr(visual, "class_embedding", None) is not None
        self.n_prefix_tokens = int(self.has_cls)
        cfg = visual.preprocess_cfg
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        resize_mode = cfg.get("resize_mode", "shortest")
        if resize_mode not in ("shortest", "squash"):
            raise HsaeError(
                f"open_clip {model_name} uses resize_mode={resize_mode!r}; hsae supports "
                "shortest and squash"
            )
        # open_clip's eval transform: shorter side to the input size, centre crop, normalise.
        self.pre = Preprocess(
            size=size,
            resize=(max(size),) if resize_mode == "shortest" else size,
            resize_mode=resize_mode,
            interpolation=cfg.get("interpolation", "bicubic"),
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )

    @property
    def visual(self) -> Any:  # open_clip's VisionTransformer (typed loosely by nn.Module)
        return self.model.visual

    def image_tower(self) -> nn.Module:
        return self.visual

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings ``[len(texts), e]`` in the joint space (CLIP's text tower)."""
        tokenizer = open_clip.get_tokenizer(self.model_name)
        device = next(self.model.parameters()).device
        return self.model.encode_text(tokenizer(texts).to(device))

    def _fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        state = self.visual.state_dict()
        return clip_canonical(state) or state

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return [
            (f"visual.transformer.resblocks.{i}", block)
            for i, block in enumerate(self.visual.transformer.resblocks)
        ]

    def _run(self, images: torch.Tensor) -> None:
        self.visual(images)

    def _to_tokens(self, acts: torch.Tensor) -> torch.Tensor:
        return acts if self.visual.transformer.batch_first else acts.transpose(0, 1)
