"""Hugging Face ``transformers`` vision towers: CLIP (``CLIPModel`` / ``CLIPVisionModel``),
ViT and DINOv2 (with or without registers), from a hub id or a local folder.

``model_name`` is a hub id (e.g. ``malper/hierarcaps-clip-b``, the RE-CLIP weights) or a
folder written by ``save_pretrained``; ``pretrained`` is an optional hub revision (branch,
tag or commit) to pin. Only the image tower is loaded: from a ``CLIPModel`` checkpoint the
text tower's weights are skipped, so RE-CLIP and CLIP load the same modules and compare by
fingerprint. Preprocessing comes from the checkpoint's ``preprocessor_config.json``; when a
checkpoint has none, from the standard processor of its model type (logged).

Needs the optional extra: ``pip install 'hsae[hf]'``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsae.backbones.base import Backbone, Preprocess
from hsae.errors import HsaeError

log = logging.getLogger(__name__)

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling codes used in preprocessor_config.json.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Where each supported model type keeps its transformer blocks (transformers 4.x and 5.x).
_BLOCK_PATHS = ("vision_model.encoder.layers", "encoder.layers", "encoder.layer", "layers")
MODEL_TYPES = ("clip", "clip_vision_model", "vit", "dinov2", "dinov2_with_registers")


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise HsaeError(
            "backbone.loader=hf needs Hugging Face transformers: pip install 'hsae[hf]'"
        ) from e
    return transformers


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _default_preprocess(model_type: str, image_size: int) -> Preprocess:
    """The standard processor of each model type, for checkpoints that ship none."""
    if model_type in ("clip", "clip_vision_model"):  # CLIPImageProcessor
        return Preprocess(
            (image_size, image_size),
            (image_size,),
            "shortest",
            "bicubic",
            _OPENAI_MEAN,
            _OPENAI_STD,
        )
    if model_type == "vit":  # ViTImageProcessor: squash to the input size
        size = (image_size, image_size)
        return Preprocess(size, size, "squash", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    # DINOv2 (BitImageProcessor as configured by the DINOv2 checkpoints): 256 then crop 224.
    return Preprocess((224, 224), (256,), "shortest", "bicubic", _IMAGENET_MEAN, _IMAGENET_STD)


def _preprocess_from_processor(processor: Any) -> Preprocess:
    """A ``Preprocess`` equal to a transformers image processor's eval pipeline."""
    size, crop = processor.size, getattr(processor, "crop_size", None)
    shortest = _size_get(size, "shortest_edge")
    if shortest is not None:
        resize: tuple[int, ...] = (int(shortest),)
        mode = "shortest"
    elif _size_get(size, "height") is not None:
        resize = (int(_size_get(size, "height")), int(_size_get(size, "width")))
        mode = "squash"
    else:
        raise HsaeError(
            f"image processor size {size!r} is not supported (need shortest_edge or height/width)"
        )
    out: tuple[int, int]
    if getattr(processor, "do_center_crop", False) and crop is not None:
        out = (int(_size_get(crop, "height")), int(_size_get(crop, "width")))
    else:
        out = (resize[0], resize[-1])  # squash: (height, width); shortest: a square crop
    resample = processor.resample
    resample = int(getattr(resample, "value", resample))
    if resample not in _RESAMPLE:
        raise HsaeError(f"image processor resample={resample} is not supported")
    if getattr(processor, "do_rescale", True) and abs(processor.rescale_factor - 1 / 255) > 1e-9:
        raise HsaeError(
            f"image processor rescale_factor={processor.rescale_factor}; hsae expects 1/255"
        )
    return Preprocess(
        size=out,
        resize=resize,
        resize_mode=mode,
        interpolation=_RESAMPLE[resample],
        mean=tuple(float(m) for m in processor.image_mean),
        std=tuple(float(s) for s in processor.image_std),
    )


class HFBackbone(Backbone):
    def __init__(self, name: str, model_id: str, revision: str | None = None):
        transformers = _import_transformers()
        self.name = name
        local = Path(model_id).expanduser()
        source = str(local) if local.exists() else model_id
        kwargs: dict[str, Any] = {} if local.exists() else {"revision": revision}
        if local.exists() and revision is not None:
            raise HsaeError(
                f"backbone.pretrained={revision!r} is a hub revision, but backbone.model_name="
                f"{model_id!r} is a local folder; set backbone.pretrained=null"
            )
        try:
            config = transformers.AutoConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            raise HsaeError(
                f"could not load the Hugging Face config of backbone.model_name={model_id!r}: {e}. "
                "Fix: give a local folder written by save_pretrained, or download the model once "
                "on a machine with internet access (it lands in the Hugging Face cache; "
                "HF_HUB_OFFLINE=1 then uses it)"
            ) from e
        self.model_type = config.model_type
        classes = {
            "clip": transformers.CLIPVisionModel,
            "clip_vision_model": transformers.CLIPVisionModel,
            "vit": transformers.ViTModel,
            "dinov2": transformers.Dinov2Model,
            "dinov2_with_registers": getattr(transformers, "Dinov2WithRegistersModel", None),
        }
        model_class = classes.get(self.model_type)
        if model_class is None:
            raise HsaeError(
                f"backbone.model_name={model_id!r} is a {self.model_type!r} model; the hf loader "
                f"supports {', '.join(MODEL_TYPES)} (dinov2_with_registers needs transformers>=4.47)"
            )
        extra = {"add_pooling_layer": False} if self.model_type in ("vit",) else {}
        try:
            model, info = model_class.from_pretrained(
                source, output_loading_info=True, **kwargs, **extra
            )
        except (OSError, ValueError) as e:
            raise HsaeError(f"could not load the weights of {model_id!r}: {e}") from e
        if info["missing_keys"] or info["mismatched_keys"]:
            # transformers would silently initialise them at random.
            missing = sorted(info["missing_keys"]) + sorted(map(str, info["mismatched_keys"]))
            raise HsaeError(
                f"{model_id!r} lacks image-tower weights {missing[:5]} ({len(missing)} in all): "
                "the checkpoint is not a complete vision model of this type"
            )
        # float32 like the other loaders, whatever dtype the checkpoint was saved in, so that
        # fingerprints and activations compare across loaders.
        self.model = model.float().eval()
        self.model.requires_grad_(False)
        vision_config = getattr(config, "vision_config", config)
        self.has_cls = True
        self.n_prefix_tokens = 1 + int(getattr(vision_config, "num_register_tokens", 0) or 0)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(source, **kwargs)
        except (OSError, ValueError):
            processor = None
        if processor is None:
            self.pre = _default_preprocess(self.model_type, int(vision_config.image_size))
            log.warning(
                "%s has no preprocessor_config.json; using the standard %s preprocessing %s",
                model_id,
                self.model_type,
                self.pre.spec(),
            )
        else:
            self.pre = _preprocess_from_processor(processor)
        # ViTs built for another input size need their position embeddings interpolated.
        self._interpolate = self.model_type in ("vit",) and tuple(self.pre.size) != (
            vision_config.image_size,
            vision_config.image_size,
        )
        self._blocks_path, self._blocks = self._find_blocks()

    def _find_blocks(self) -> tuple[str, nn.ModuleList]:
        for path in _BLOCK_PATHS:
            try:
                blocks = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList):
                return path, blocks
        raise HsaeError(
            f"cannot find the transformer blocks of {self.name} ({type(self.model).__name__}); "
            f"looked for {', '.join(_BLOCK_PATHS)}"
        )

    def image_tower(self) -> nn.Module:
        return self.model

    def _fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if self.model_type not in ("clip", "clip_vision_model"):
            return state
        # CLIP towers hash under CLIPVisionModel's names in every transformers version (and
        # so equal open_clip's canonical form, see hsae.backbones.open_clip.clip_canonical).
        return {
            key.removeprefix("vision_model."): tensor
            for key, tensor in state.items()
            if not key.endswith("position_ids")
        }

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"{self._blocks_path}.{i}", block) for i, block in enumerate(self._blocks)]

    def _run(self, images: torch.Tensor) -> None:
        if self._interpolate:
            self.model(pixel_values=images, interpolate_pos_encoding=True)
        else:
            self.model(pixel_values=images)
