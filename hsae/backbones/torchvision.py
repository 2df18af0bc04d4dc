"""torchvision classification models: AlexNet, the ResNet family and ViT.

``model_name`` is a torchvision builder name (``alexnet``, ``resnet50``, ``vit_b_16``...);
``pretrained``: None = random weights seeded by ``init_seed``; a weights name of that
model (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ``DEFAULT``), downloaded to the torch hub
cache; or a local state-dict file. Preprocessing is the weights' own eval transform (the
model's default weights when loading random or local weights).

Layers: AlexNet's five conv ReLUs and two fully connected ReLUs (fc6, fc7: one token
each); a ResNet's stem and four stages; a ViT's encoder blocks. CNN tokens are the spatial
positions of the feature map (no CLS token; ``tokens=mean`` is global average pooling).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torchvision.models import ResNet, VisionTransformer

from hsae.backbones.base import Preprocess, WholeModelBackbone
from hsae.errors import HsaeError

ALEXNET_LAYERS = (
    "features.1",  # conv1 + ReLU
    "features.4",  # conv2 + ReLU
    "features.7",  # conv3 + ReLU
    "features.9",  # conv4 + ReLU
    "features.11",  # conv5 + ReLU
    "classifier.2",  # fc6 + ReLU
    "classifier.5",  # fc7 + ReLU
)
RESNET_LAYERS = ("relu", "layer1", "layer2", "layer3", "layer4")  # stem as in timm's act1


def _weights(model_name: str, pretrained: str | None):
    enum = torchvision.models.get_model_weights(model_name)
    valid = [w.name for w in enum]
    if pretrained is None or Path(pretrained).expanduser().exists():
        return None, enum.DEFAULT
    if pretrained == "DEFAULT":
        return enum.DEFAULT, enum.DEFAULT
    if pretrained not in valid:
        raise HsaeError(
            f"backbone.pretrained={pretrained!r} is not a torchvision weights name of "
            f"{model_name} nor an existing file; valid: {', '.join([*valid, 'DEFAULT'])}, a "
            "state-dict path, or null for random weights"
        )
    return enum[pretrained], enum[pretrained]


def _create_model(model_name: str, pretrained: str | None, init_seed: int):
    if model_name not in torchvision.models.list_models(module=torchvision.models):
        raise HsaeError(
            f"backbone.model_name={model_name!r} is not a torchvision classification model; "
            "e.g. alexnet, resnet50, vit_b_16 (see torchvision.models.list_models())"
        )
    weights, transform_weights = _weights(model_name, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = torchvision.models.get_model(model_name, weights=weights)
        except Exception as e:
            if weights is None:
                raise
            raise HsaeError(
                f"could not load torchvision weights {model_name}.{pretrained}: {e}. Fix: "
                "download them once on a machine with internet access (they land in the torch "
                "hub cache) or set backbone.pretrained to a local state-dict file"
            ) from e
    if pretrained is not None and weights is None:  # a local state-dict file
        path = Path(pretrained).expanduser()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise HsaeError(f"{path} is not a state dict of torchvision {model_name}: {e}") from e
    return model, transform_weights


class TorchvisionBackbone(WholeModelBackbone):
    def __init__(self, name: str, model_name: str, pretrained: str | None, init_seed: int = 0):
        self.name = name
        model, weights = _create_model(model_name, pretrained, init_seed)
        self.model = model.eval()
        self.model.requires_grad_(False)
        if isinstance(model, ResNet):
            self._layer_names = list(RESNET_LAYERS)
            self.has_cls, self.n_prefix_tokens = False, 0
        elif model_name == "alexnet":
            self._layer_names = list(ALEXNET_LAYERS)
            self.has_cls, self.n_prefix_tokens = False, 0
        elif isinstance(model, VisionTransformer):
            self._layer_names = [
                f"encoder.layers.encoder_layer_{i}" for i in range(len(model.encoder.layers))
            ]
            self.has_cls, self.n_prefix_tokens = True, 1
        else:
            raise HsaeError(
                f"torchvision {model_name!r} is not supported; supported: alexnet, the ResNet "
                "family (resnet*, resnext*, wide_resnet*) and vit_*"
            )
        transform = weights.transforms()
        self.pre = Preprocess(
            size=(transform.crop_size[0], transform.crop_size[0]),
            resize=(transform.resize_size[0],),
            resize_mode="shortest",
            interpolation=transform.interpolation.value,
            mean=tuple(transform.mean),
            std=tuple(transform.std),
        )
