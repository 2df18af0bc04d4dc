"""The adapter interface every backbone implements, and token selection.

An adapter wraps a vision model, lists the layers that can be hooked, and captures the
output of one or several layers in a single forward pass (stopping after the deepest one).
Captured activations are ``[batch, tokens, d]`` with the CLS token, when the model has one,
at token 0; ``select_tokens`` turns them into rows for the cache.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hsae.errors import HsaeError

# Token index recorded for rows that are not a single token (``mean`` pooling).
POOLED_TOKEN = -1


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path inside the model, e.g. "visual.transformer.resblocks.3"
    index: int
    n_tokens: int  # including the CLS token
    d_model: int


class Backbone(ABC):
    """A vision model with hookable layers. Subclasses set ``model`` and ``has_cls``."""

    name: str
    model: nn.Module
    has_cls: bool = True

    @abstractmethod
    def layers(self) -> list[LayerInfo]: ...

    @abstractmethod
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """One ``[3, H, W]`` float image in [0, 1] -> the model's normalised input."""

    @abstractmethod
    def preprocess_spec(self) -> dict:
        """What determines ``preprocess`` (goes into cache keys)."""

    @abstractmethod
    def _hook_modules(self) -> list[nn.Module]: ...

    @abstractmethod
    def _run(self, images: torch.Tensor) -> None:
        """Forward pass of the image tower (its output is discarded)."""

    @abstractmethod
    def image_tower(self) -> nn.Module: ...

    def check_layer(self, layer: int) -> LayerInfo:
        infos = self.layers()
        if not 0 <= layer < len(infos):
            raise HsaeError(
                f"backbone.layer={layer} is out of range: {self.name} has {len(infos)} blocks, "
                f"valid layers are 0..{len(infos) - 1}"
            )
        return infos[layer]

    @torch.no_grad()
    def capture(self, images: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Outputs ``[batch, tokens, d]`` of the given blocks, in one forward pass."""
        for layer in layers:
            self.check_layer(layer)
        modules = self._hook_modules()
        captured: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def make_hook(layer: int):
            def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
                captured[layer] = output[0] if isinstance(output, tuple) else output
                if layer == deepest:
                    raise _StopForward

            return hook

        handles = [modules[layer].register_forward_hook(make_hook(layer)) for layer in set(layers)]
        try:
            self._run(images)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {layer: self._to_batch_first(captured[layer]) for layer in layers}

    def _to_batch_first(self, acts: torch.Tensor) -> torch.Tensor:
        return acts

    def fingerprint(self) -> str:
        """Hash of the image tower's parameters and buffers: equal towers, equal activations."""
        digest = hashlib.sha256()
        for key, tensor in sorted(self.image_tower().state_dict().items()):
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


class _StopForward(Exception):
    """Raised by the deepest hook so that blocks after it are not computed."""


def select_tokens(acts_btd: torch.Tensor, tokens: str, has_cls: bool = True):
    """Rows for the cache and the token index of each row.

    Returns ``(rows [n, d], token_index [tokens per image])``: the image of row ``r`` is
    ``r // len(token_index)`` within the batch, its token ``token_index[r % len(token_index)]``
    (``POOLED_TOKEN`` for ``mean``).
    """
    _, n_tokens, d = acts_btd.shape
    first_patch = 1 if has_cls else 0
    patch_index = torch.arange(first_patch, n_tokens)
    if tokens == "cls":
        if not has_cls:
            raise HsaeError(
                "backbone.tokens=cls but this model has no CLS token; use mean or patch"
            )
        return acts_btd[:, 0], torch.tensor([0])
    if tokens == "patch":
        return acts_btd[:, first_patch:].reshape(-1, d), patch_index
    if tokens == "mean":
        return acts_btd[:, first_patch:].mean(dim=1), torch.tensor([POOLED_TOKEN])
    if tokens == "all":
        return acts_btd.reshape(-1, d), torch.arange(n_tokens)
    raise HsaeError(f"backbone.tokens={tokens!r} is not valid; choose cls, patch, mean or all")
