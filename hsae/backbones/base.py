"""The adapter interface every backbone implements, preprocessing, and token selection.

An adapter wraps a vision model, lists the layers that can be hooked, and captures the
output of one or several layers in a single forward pass (stopping after the deepest one).
Captured activations are ``[batch, tokens, d]``: for transformers the prefix tokens (CLS,
distillation or register tokens) come first, for CNNs the tokens are the spatial positions
of a stage's feature map in row-major order, and for a fully connected layer there is one
token. ``select_tokens`` turns them into rows for the cache.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode

from hsae.errors import HsaeError
from hsae.fingerprint import same_image_tower_warning  # noqa: F401 - re-exported

# Token index recorded for rows that are not a single token (``mean`` pooling).
POOLED_TOKEN = -1

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path inside the model, e.g. "visual.transformer.resblocks.3"
    index: int
    n_tokens: int  # including prefix (CLS) tokens
    d_model: int


@dataclass(frozen=True)
class Preprocess:
    """A model's own eval preprocessing: resize, centre crop, normalise.

    The same steps run on PIL images (PIL's resampling, as torchvision's transforms do) and
    on float tensors in [0, 1] (antialiased torch resampling), so both give the model the
    input it was trained on.
    """

    size: tuple[int, int]  # (height, width) the model sees
    resize: tuple[int, ...]  # (shorter side,) for "shortest", (height, width) for "squash"
    resize_mode: str  # shortest: keep aspect, then centre crop | squash: stretch to `resize`
    interpolation: str  # bicubic | bilinear | nearest
    mean: tuple[float, ...]  # per RGB channel
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.resize_mode not in ("shortest", "squash"):
            raise HsaeError(
                f"resize_mode={self.resize_mode!r} is not supported; use shortest or squash"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise HsaeError(
                f"interpolation={self.interpolation!r} is not supported; "
                f"valid: {', '.join(_INTERPOLATIONS)}"
            )

    @classmethod
    def crop_pct(cls, size: int, crop_pct: float, interpolation: str, mean, std) -> Preprocess:
        """timm/torchvision style: shorter side to ``floor(size / crop_pct)``, crop ``size``."""
        return cls(
            size=(size, size),
            resize=(int(size / crop_pct),),
            resize_mode="shortest",
            interpolation=interpolation,
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
        )

    def spec(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _as_float_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise HsaeError(
            f"backbone preprocessing expects a [3, H, W] image tensor (or a PIL image), got "
            f"shape {tuple(image.shape)}; convert greyscale/RGBA images to RGB first"
        )
    if image.dtype == torch.uint8:
        return image.float() / 255
    if not image.is_floating_point():
        raise HsaeError(
            f"backbone preprocessing expects float images in [0, 1] or uint8, got {image.dtype}"
        )
    return image.float()


class Backbone(ABC):
    """A vision model with hookable layers.

    Subclasses set ``name``, ``model``, ``pre`` (a ``Preprocess``), ``has_cls`` and
    ``n_prefix_tokens``, and implement ``_named_layers``, ``_run`` and ``image_tower``.
    """

    name: str
    model: nn.Module
    pre: Preprocess
    has_cls: bool = True
    n_prefix_tokens: int = 1  # tokens before the patches (CLS, distillation, registers)
    # One row per segment token (backbone.tokens=segments, ``capture_segments``): CAST only.
    has_segment_tokens: bool = False
    _layer_infos: list[LayerInfo] | None = None

    @abstractmethod
    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        """The hookable modules in forward order, with their paths inside ``model``."""

    @abstractmethod
    def _run(self, images: torch.Tensor) -> None:
        """Forward pass of the image tower (its output is discarded)."""

    @abstractmethod
    def image_tower(self) -> nn.Module:
        """The modules whose weights determine the image activations (fingerprinted)."""

    # ---- preprocessing -------------------------------------------------------------

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pre.size

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.pre.mean).view(3, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.pre.std).view(3, 1, 1)

    def preprocess(self, image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
        """One image (PIL, or a ``[3, H, W]`` float tensor in [0, 1]) -> the model's input."""
        return self.normalize(self.resize_crop(image))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[..., 3, H, W]`` in [0, 1] -> normalised, on the images' device (the cache
        builder normalises whole batches on the GPU)."""
        mean = self.mean.to(images.device)
        std = self.std.to(images.device)
        return (images - mean) / std

    def resize_crop(self, image: Image.Image | torch.Tensor | np.ndarray) -> torch.Tensor:
        """The geometric part of ``preprocess``: a ``[3, H, W]`` float tensor in [0, 1]."""
        pre = self.pre
        interpolation = _INTERPOLATIONS[pre.interpolation]
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            if pre.resize_mode == "squash" or min(image.size) != pre.resize[0]:
                image = TF.resize(image, list(pre.resize), interpolation=interpolation)
            image = TF.center_crop(image, list(pre.size))
            tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        else:
            tensor = _as_float_image(image)
            h, w = tensor.shape[-2:]
            needs_resize = (
                (h, w) != tuple(pre.resize)
                if pre.resize_mode == "squash"
                else min(h, w) != pre.resize[0]
            )
            if needs_resize:
                tensor = TF.resize(
                    tensor, list(pre.resize), interpolation=interpolation, antialias=True
                ).clamp(0, 1)  # bicubic overshoots; PIL's uint8 output is clipped the same way
            if tuple(tensor.shape[-2:]) != pre.size:
                tensor = TF.center_crop(tensor, list(pre.size))
        return tensor

    def preprocess_spec(self) -> dict:
        """What determines ``preprocess`` (goes into cache keys)."""
        return self.pre.spec()

    # ---- layers and capture --------------------------------------------------------

    def layers(self) -> list[LayerInfo]:
        """Hookable layers with their token count and width at the preprocessing size."""
        if self._layer_infos is None:
            self._layer_infos = self._probe_layers()
        return self._layer_infos

    def _probe_layers(self) -> list[LayerInfo]:
        # One forward of a blank image through every layer: shapes come from the model
        # itself, so token counts follow the preprocessing size (e.g. DINOv2 at 224, not
        # its config's 518) and CNN stages need no table of widths.
        named = self._named_layers()
        shapes: dict[int, tuple[int, ...]] = {}

        def make_hook(i: int):
            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                shapes[i] = tuple(self._to_tokens(_first(output)).shape)

            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, (_, m) in enumerate(named)]
        param = next(self.model.parameters())
        try:
            with torch.no_grad():
                self._run(torch.zeros(1, 3, *self.pre.size, device=param.device, dtype=param.dtype))
        finally:
            for handle in handles:
                handle.remove()
        return [LayerInfo(name, i, shapes[i][1], shapes[i][2]) for i, (name, _) in enumerate(named)]

    def check_layer(self, layer: int) -> LayerInfo:
        infos = self.layers()
        if not 0 <= layer < len(infos):
            raise HsaeError(
                f"backbone.layer={layer} is out of range: {self.name} has {len(infos)} hookable "
                f"layers, valid layers are 0..{len(infos) - 1} "
                f"({infos[0].name} .. {infos[-1].name})"
            )
        return infos[layer]

    @torch.no_grad()
    def capture(self, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs ``[batch, tokens, d]`` of the given layers, in one forward pass."""
        for layer in layers:
            self.check_layer(layer)
        named = self._named_layers()
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def make_hook(layer: int):
            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                # A copy: CNNs apply in-place ReLUs to tensors that later layers may reuse.
                captured[layer] = self._to_tokens(_first(output)).clone()
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = [named[layer][1].register_forward_hook(make_hook(layer)) for layer in set(layers)]
        try:
            self._run(images)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {layer: captured[layer] for layer in layers}

    @torch.no_grad()
    def forward_edited(
        self, images: torch.Tensor, layer: int, edit: Callable[[torch.Tensor], None] | None
    ) -> torch.Tensor:
        """The image tower's output (its pooled embedding or logits) when ``edit`` changes
        layer ``layer``'s output in place, seen as ``[batch, tokens, d]``, before the rest of
        the model runs (``edit=None``: the plain output). Used to steer with SAE latents."""
        self.check_layer(layer)
        outputs: list[object] = []

        def edit_hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if edit is not None:
                # A view of the output: writing into it changes what the next layer sees.
                edit(self._to_tokens(_first(output)))

        def tower_hook(_module: nn.Module, _inputs: object, output: object) -> None:
            outputs.append(output)

        handles = [
            self._named_layers()[layer][1].register_forward_hook(edit_hook),
            self.image_tower().register_forward_hook(tower_hook),
        ]
        try:
            self._run(images)
        finally:
            for handle in handles:
                handle.remove()
        if not outputs:
            raise HsaeError(f"{self.name}: the image tower did not run; cannot read its output")
        return _embedding(outputs[-1])

    def _to_tokens(self, acts: torch.Tensor) -> torch.Tensor:
        """A layer's raw output -> ``[batch, tokens, d]``."""
        if acts.ndim == 4:  # CNN feature map [B, C, H, W]: tokens are positions, row-major
            return acts.flatten(2).transpose(1, 2)
        if acts.ndim == 2:  # fully connected layer: one token
            return acts[:, None]
        return acts

    # ---- identity ------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Hash of the image tower's parameters and buffers: equal towers, equal activations."""
        return hash_tensors(self._fingerprint_tensors())

    def _fingerprint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors ``fingerprint`` hashes; adapters of one architecture family override
        this with loader-independent names (see ``open_clip.clip_canonical``)."""
        return self.image_tower().state_dict()

    def select(self, acts_btd: torch.Tensor, tokens: str):
        """``select_tokens`` with this model's prefix tokens."""
        return select_tokens(acts_btd, tokens, self.has_cls, self.n_prefix_tokens)

    def token_index(self, n_tokens: int, tokens: str) -> torch.Tensor:
        """The token index ``select`` returns for a layer of ``n_tokens`` tokens, without
        activations (the cache builder records it before the first batch)."""
        return token_layout(n_tokens, tokens, self.has_cls, self.n_prefix_tokens)

    # ---- segment trees (CAST) ------------------------------------------------------

    def segment_tree_forward(self) -> Callable[[torch.Tensor], Any] | None:
        """The forward pass giving a batch's segment trees (a ``CastOutput``) from
        ``normalize``d images, or None (the default): this backbone builds no segment tree."""
        return None

    def capture_segments(self, images: torch.Tensor, layer: int) -> tuple[Any, Any]:
        """Segment rows of ``layer`` and each image's segment tree (``has_segment_tokens``
        backbones only)."""
        raise HsaeError(
            f"{self.name} has fixed tokens, no segment tokens: capture_segments needs a CAST "
            "backbone (loader: cast)"
        )


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) over names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def _embedding(output: object) -> torch.Tensor:
    """A tower's output as one tensor per image: the tensor itself, the first of a tuple,
    or a Hugging Face output's ``image_embeds`` / ``pooler_output`` / ``logits``."""
    for key in ("image_embeds", "pooler_output", "logits"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return _first(output)


def _first(output: object) -> torch.Tensor:
    # Hugging Face blocks return tuples (hidden_states, attentions, ...) in older versions.
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


class WholeModelBackbone(Backbone):
    """A backbone whose ``model`` is the image tower itself, run on the images alone, with
    its hookable layers at the module paths ``_layer_names`` (timm, torchvision)."""

    _layer_names: list[str]

    def image_tower(self) -> nn.Module:
        return self.model

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return [(name, self.model.get_submodule(name)) for name in self._layer_names]

    def _run(self, images: torch.Tensor) -> None:
        self.model(images)


class _StopForward(Exception):
    """Raised by the deepest hook so that layers after it are not computed."""


def select_tokens(
    acts_btd: torch.Tensor, tokens: str, has_cls: bool = True, n_prefix: int | None = None
):
    """Rows for the cache and the token index of each row.

    ``n_prefix`` tokens (CLS first, then e.g. distillation or register tokens) precede the
    patches; by default 1 with a CLS token, 0 without. Returns ``(rows [n, d], token_index
    [tokens per image])``: the image of row ``r`` is ``r // len(token_index)`` within the
    batch, its token ``token_index[r % len(token_index)]`` (``POOLED_TOKEN`` for ``mean``,
    which averages the patch tokens: global average pooling for a CNN).
    """
    _, n_tokens, d = acts_btd.shape
    token_index = token_layout(n_tokens, tokens, has_cls, n_prefix)  # checks ``tokens``
    first_patch = _first_patch(has_cls, n_prefix)
    if tokens == "cls":
        return acts_btd[:, 0], token_index
    if tokens == "patch":
        return acts_btd[:, first_patch:].reshape(-1, d), token_index
    if tokens == "mean":
        return acts_btd[:, first_patch:].mean(dim=1), token_index
    return acts_btd.reshape(-1, d), token_index  # all


def token_layout(
    n_tokens: int, tokens: str, has_cls: bool = True, n_prefix: int | None = None
) -> torch.Tensor:
    """The token index ``select_tokens`` returns for ``n_tokens`` tokens per image."""
    first_patch = _first_patch(has_cls, n_prefix)
    if tokens == "cls":
        if not has_cls:
            raise HsaeError(
                "backbone.tokens=cls but this model has no CLS token (a CNN or a ViT without "
                "one); use backbone.tokens=mean (global average pool) or patch"
            )
        return torch.tensor([0])
    if tokens == "patch":
        return torch.arange(first_patch, n_tokens)
    if tokens == "mean":
        return torch.tensor([POOLED_TOKEN])
    if tokens == "all":
        return torch.arange(n_tokens)
    raise HsaeError(f"backbone.tokens={tokens!r} is not valid; choose cls, patch, mean or all")


def _first_patch(has_cls: bool, n_prefix: int | None) -> int:
    # By default 1 prefix token with a CLS token, 0 without.
    return (1 if has_cls else 0) if n_prefix is None else n_prefix
