"""Hugging Face ``transformers`` vision towers: CLIP (``CLIPModel`` / ``CLIPVisionModel``),
ViT and DINOv2 (with or without registers), from a hub id or a local folder.

``model_name`` is a hub id (e.g. ``malper/hierarcaps-clip-b``, the RE-CLIP weights) or a
folder written by ``save_pretrained``; ``pretrained`` is an optional hub revision (branch,
tag or commit) to pin. Preprocessing comes from the checkpoint's ``preprocessor_config.json``;
when a checkpoint has none, from the standard processor of its model type (logged).

A ``CLIPModel`` checkpoint (model type ``clip``) loads whole, text tower included, so that
the joint image-text metrics (``dataset=hierarcaps``, zero-shot with the SAE spliced in)
work as with an open_clip CLIP: the backbone has ``encode_text`` (``get_text_features``:
the checkpoint's own tokenizer, padded and truncated to the text tower's context length,
then ``text_projection``), and its image output (``forward_edited``) is the joint-space
embedding (``get_image_features``: the pooled output through ``visual_projection``). The
fingerprint still hashes the vision transformer only, under ``CLIPVisionModel``'s names, so
RE-CLIP (which fine-tunes only the text tower) and CLIP compare equal, across loaders too.

A ``CLIPModel`` checkpoint without a usable tokenizer (no ``tokenizer.json`` or
``vocab.json`` + ``merges.txt``, or one that does not fit the text tower) or without its
text weights or projections still loads, as an image tower only, with a warning that names
the fix: hooking layers, caching and training SAEs need nothing else, while the joint
metrics then fail with an error (``dataset=hierarcaps``) or are left out (zero-shot).
Image-only checkpoints (``CLIPVisionModel``, ViT, DINOv2) never have ``encode_text``.

Needs the optional extra: ``pip install 'hsae[hf]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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


def _pooled(output: Any) -> torch.Tensor:
    """The pooled (or projected) embedding of a CLIP tower's output: a tensor in
    transformers 4.x ``get_*_features``, a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds it in 5.x, or the second item of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    return output[1]


class _ClipImageEmbedding(nn.Module):
    """``CLIPModel.get_image_features`` as a module (sharing the model's submodules), so that
    ``forward_edited``'s hook on the image tower sees the joint-space image embedding."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.vision_model = clip.get_submodule("vision_model")
        self.visual_projection = clip.get_submodule("visual_projection")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(_pooled(self.vision_model(pixel_values=pixel_values)))


_TOKENIZER_FIX = (
    "Fix: put the tokenizer files of the CLIP it was fine-tuned from (tokenizer.json, or "
    "vocab.json and merges.txt, with tokenizer_config.json and special_tokens_map.json; all "
    "OpenAI CLIPs share them, e.g. openai/clip-vit-base-patch32's) beside its weights"
)


def _load_clip_tokenizer(
    transformers: Any, source: str, kwargs: dict[str, Any], text_config: Any
) -> tuple[Any, str | None]:
    """The checkpoint's tokenizer, or None and why it cannot serve the text tower."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        return None, f"no tokenizer could be loaded ({e})"
    # transformers 5 builds a 2-token CLIPTokenizer when the files are missing: probe it.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer("a photo of a dog.")["input_ids"]
    eos = tokenizer.eos_token_id
    if len(ids) < 3 or ids[-1] != eos or eos in ids[1:-1]:
        return None, (
            f"its tokenizer cannot encode text ({len(tokenizer)} tokens; a CLIP tokenizer has "
            "49408): the tokenizer files are missing"
        )
    if len(tokenizer) > text_config.vocab_size:
        return None, (
            f"its tokenizer has {len(tokenizer)} tokens but the text tower only "
            f"{text_config.vocab_size}"
        )
    # Where the text tower pools: at the first eos_token_id, or with the legacy config value
    # 2, at the highest id. It must be the tokenizer's end-of-text token.
    pool_id = max(ids) if text_config.eos_token_id == 2 else text_config.eos_token_id
    pool_at = ids.index(pool_id) if pool_id in ids else -1
    if pool_at != len(ids) - 1:
        return None, (
            f"the text tower (eos_token_id={text_config.eos_token_id}) would not pool at its "
            f"tokenizer's end-of-text token (id {eos})"
        )
    return tokenizer, None


def _load_weights(
    model_class: Any, source: str, model_id: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, list[str]]:
    """The model and the keys transformers would initialise at random (missing or with
    another shape in the checkpoint)."""
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise HsaeError(f"could not load the weights of {model_id!r}: {e}") from e
    missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
    return model, missing


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
        self._tokenizer: Any = None
        self._text_max_length = 0
        model = None
        if self.model_type == "clip":
            model = self._load_clip_model(transformers, config, source, model_id, kwargs)
        if model is None:
            model, missing = _load_weights(model_class, source, model_id, kwargs | extra)
            if missing:
                # transformers would silently initialise them at random.
                raise HsaeError(
                    f"{model_id!r} lacks image-tower weights {missing[:5]} ({len(missing)} in "
                    "all): the checkpoint is not a complete vision model of this type"
                )
        # float32 like the other loaders, whatever dtype the checkpoint was saved in, so that
        # fingerprints and activations compare across loaders.
        self.model = model.float().eval()
        self.model.requires_grad_(False)
        # A CLIPModel's image output is its joint-space embedding (open_clip's CLIP agrees).
        self._tower: nn.Module = (
            _ClipImageEmbedding(self.model) if self._tokenizer is not None else self.model
        )
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

    def _load_clip_model(
        self, transformers: Any, config: Any, source: str, model_id: str, kwargs: dict[str, Any]
    ) -> nn.Module | None:
        """The whole ``CLIPModel`` with its tokenizer kept, or None (warned) when its text
        side is unusable and only the image tower should be loaded."""
        tokenizer, why_not = _load_clip_tokenizer(transformers, source, kwargs, config.text_config)
        fix = _TOKENIZER_FIX
        model = None
        if tokenizer is not None:
            model, missing = _load_weights(transformers.CLIPModel, source, model_id, kwargs)
            vision = [key for key in missing if key.startswith("vision_model.")]
            if vision:
                raise HsaeError(
                    f"{model_id!r} lacks image-tower weights {vision[:5]} ({len(vision)} in "
                    "all): the checkpoint is not a complete vision model of this type"
                )
            joint = [key for key in missing if key != "logit_scale"]
            if joint:
                why_not = f"it lacks weights {joint[:3]} ({len(joint)} in all)"
                fix = "Fix: save the whole CLIPModel (text tower and projections included)"
        if why_not is not None:
            log.warning(
                "%s is a CLIPModel checkpoint, but %s: loading its image tower only, so the "
                "joint image-text metrics (dataset=hierarcaps, zero-shot) are unavailable. %s",
                model_id,
                why_not,
                fix,
            )
            return None
        self._tokenizer = tokenizer
        self._text_max_length = int(config.text_config.max_position_embeddings)
        return model

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
        return self._tower

    @property
    def encode_text(self) -> Callable[[Sequence[str]], torch.Tensor]:
        """Text embeddings ``[len(texts), e]`` in the joint space (``get_text_features``).

        Exists only for a ``CLIPModel`` checkpoint loaded with its text tower and tokenizer:
        otherwise ``hasattr(backbone, "encode_text")`` is False, as for any image-only
        backbone (the joint metrics check it)."""
        if self._tokenizer is None:
            raise AttributeError(f"{self.name} has no text tower (image tower loaded only)")
        return self._encode_text

    @torch.no_grad()
    def _encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self._text_max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        clip: Any = self.model  # a CLIPModel (typed loosely by nn.Module)
        output = clip.get_text_features(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
        )
        return _pooled(output)

    def _fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        if self.model_type not in ("clip", "clip_vision_model"):
            return self.model.state_dict()
        # CLIP towers hash the vision transformer alone (no projection, no text tower) under
        # CLIPVisionModel's names in every transformers version (and so equal open_clip's
        # canonical form, see hsae.backbones.open_clip.clip_canonical).
        joint = self._tokenizer is not None
        tower = self.model.get_submodule("vision_model") if joint else self.model
        return {
            key.removeprefix("vision_model."): tensor
            for key, tensor in tower.state_dict().items()
            if not key.endswith("position_ids")
        }

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"{self._blocks_path}.{i}", block) for i, block in enumerate(self._blocks)]

    def _run(self, images: torch.Tensor) -> None:
        if self._interpolate:
            self._tower(pixel_values=images, interpolate_pos_encoding=True)
        else:
            self._tower(pixel_values=images)
