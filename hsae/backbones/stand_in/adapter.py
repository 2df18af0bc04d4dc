"""The stand-ins as backbones: ``backbone.loader=stand_in``.

``model_name`` is the architecture (``vit``, or one registered in ``models.ARCHITECTURES``),
``pretrained`` the objective (``flat`` | ``hier``), ``init_seed`` the backbone seed and
``recipe`` optional overrides of the training recipe. Loading one that is not in the store
trains it first (logging progress), so every command works on a fresh machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hsae.backbones.base import Backbone, Preprocess
from hsae.backbones.stand_in.store import ensure_stand_in, load_stand_in
from hsae.backbones.stand_in.train import MEAN, STD, Recipe


class StandInBackbone(Backbone):
    def __init__(
        self,
        name: str,
        arch: str,
        objective: str | None,
        seed: int = 0,
        recipe: Recipe | dict[str, Any] | None = None,
    ):
        self.name = name
        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_dict(recipe)
        # A None objective (a config that left `pretrained` unset) is caught by make_objective.
        self.store_path = ensure_stand_in(arch, str(objective), seed, recipe)
        stand_in, self.train_config, self.train_metrics = load_stand_in(self.store_path)
        stand_in.requires_grad_(False)
        self.model = stand_in
        self.encoder = encoder = stand_in.encoder  # typed: Backbone.model is any nn.Module
        self.has_cls = bool(encoder.has_cls)
        self.n_prefix_tokens = int(encoder.n_prefix_tokens)
        size = recipe.image_size
        # The training images are rendered at this size; other sizes are resized to it.
        self.pre = Preprocess(
            size=(size, size),
            resize=(size,),
            resize_mode="shortest",
            interpolation="bilinear",
            mean=MEAN,
            std=STD,
        )

    def image_tower(self) -> nn.Module:
        return self.encoder

    def _named_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"encoder.{path}", module) for path, module in self.encoder.hook_layers()]

    def _run(self, images: torch.Tensor) -> None:
        self.encoder(images)

    def segment_tree_forward(self) -> Callable[[torch.Tensor], Any] | None:
        # Imported here: CAST is loaded only for a CAST stand-in (see models.py).
        from hsae.backbones.cast.stand_in import CastStandIn

        return self.encoder.forward_tree if isinstance(self.encoder, CastStandIn) else None
