"""The stand-ins' training recipe: identical data, augmentation, steps, optimiser and budget
for every objective and architecture; only the objective (``flat`` | ``hier``) differs.

The training images are ``synthetic_tree`` (train split, ``data_seed``), rendered once and
held in memory; the held-out images are its val split. The backbone seed (``init_seed``)
sets the initialisation and the batch order and augmentation, never the data.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from hsae.backbones.stand_in.models import StandIn, make_stand_in
from hsae.backbones.stand_in.objectives import make_objective
from hsae.cpcc import cpcc_of_classes
from hsae.data.synthetic_tree import HIERARCHY, SyntheticTree
from hsae.errors import HsaeError

log = logging.getLogger(__name__)

# The input normalisation the stand-ins are trained with (and their adapter applies).
MEAN = (0.25, 0.25, 0.25)
STD = (0.3, 0.3, 0.3)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a stand-in besides (architecture, objective, seed); part of
    the store hash. Override fields with ``backbone.recipe={steps: 50, ...}`` or
    ``ensure_stand_in(..., recipe=Recipe(steps=50))``."""

    image_size: int = 32
    n_train: int = 8192
    n_val: int = 2048
    data_seed: int = 0  # the images; the same for every stand-in
    steps: int = 1800
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50  # then cosine decay to 0
    shift: int = 2  # augmentation: random translation by up to this many pixels
    flip: bool = True  # augmentation: horizontal flips (every class is mirror-symmetric)
    # hier: weight of the CPCC regulariser. 1.0 cost leaf accuracy (0.87-0.91) for little
    # more CPCC; 0.3 keeps leaves at 0.93-0.95 with the embedding's CPCC at 0.93.
    cpcc_weight: float = 0.3
    coarse_ce_weight: float = 1.0  # hier: weight of each coarser level's cross-entropy
    # Architecture arguments (see models.py); e.g. {"d_model": 64, "depth": 4}.
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("image_size", "n_train", "n_val", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise HsaeError(f"stand-in recipe: {name}={getattr(self, name)} must be > 0")
        if self.lr <= 0 or self.cpcc_weight < 0 or self.shift < 0:
            raise HsaeError(
                f"stand-in recipe: need lr > 0, cpcc_weight >= 0, shift >= 0; got lr={self.lr}, "
                f"cpcc_weight={self.cpcc_weight}, shift={self.shift}"
            )

    @classmethod
    def from_dict(cls, overrides: dict[str, Any] | None) -> Recipe:
        overrides = dict(overrides or {})
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise HsaeError(
                f"backbone.recipe has unknown fields {unknown}; valid: {', '.join(sorted(valid))}"
            )
        return cls(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=2)
def _images(n: int, image_size: int, seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered, normalised images and labels of a split; cached because every stand-in of
    a study trains on the same images."""
    ds = SyntheticTree(n, image_size, seed, split)
    images = (ds.render_all() - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    return images, torch.as_tensor(ds.labels_nl)


def _augment(x: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    # Random draws come from a CPU generator, so a seed gives the same run on any device.
    if recipe.flip:
        flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if recipe.shift:
        s, size = recipe.shift, x.shape[-1]
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        # One offset per batch quarter keeps this cheap (a crop per image costs a Python loop).
        out = torch.empty_like(x)
        for chunk in torch.arange(len(x)).chunk(4):
            dy, dx = torch.randint(0, 2 * s + 1, (2,), generator=gen).tolist()
            out[chunk] = padded[chunk, :, dy : dy + size, dx : dx + size]
        x = out
    return x


def _lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_stand_in(
    arch: str, objective: str, seed: int, recipe: Recipe, device: str | torch.device = "cpu"
) -> tuple[StandIn, dict]:
    """Train one stand-in; returns the model (eval mode, on the CPU) and its held-out
    metrics. ``device`` only changes where it runs (the store trains on the CPU)."""
    loss_fn = make_objective(objective, HIERARCHY, recipe.cpcc_weight, recipe.coarse_ce_weight)
    n_classes = [HIERARCHY.n_classes(lv) for lv in range(HIERARCHY.n_levels)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_stand_in(arch, recipe.image_size, n_classes, dict(recipe.arch_kwargs))
    model.to(device)
    images, labels = _images(recipe.n_train, recipe.image_size, recipe.data_seed, "train")
    images, labels = images.to(device), labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
    )
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(images), generator=gen)
    cursor = 0
    log_every = max(1, recipe.steps // 10)
    for step in range(recipe.steps):
        if cursor + recipe.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor : cursor + recipe.batch_size].to(device)
        cursor += recipe.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe)
        emb, logits = model(_augment(images[idx], recipe, gen))
        loss, terms = loss_fn(emb, logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step == recipe.steps - 1:
            log.info(
                "stand-in %s-%s-s%d: step %d/%d loss %.3f %s (%.0f s)",
                arch, objective, seed, step + 1, recipe.steps, float(loss.detach()),
                " ".join(f"{k} {v:.3f}" for k, v in terms.items()), time.perf_counter() - start,
            )  # fmt: skip
    model.eval()
    train_seconds = time.perf_counter() - start
    metrics = evaluate_stand_in(model, recipe)
    metrics["train_seconds"] = train_seconds
    return model.cpu(), metrics


@torch.no_grad()
def evaluate_stand_in(model: StandIn, recipe: Recipe) -> dict[str, float]:
    """Held-out (val split) accuracy per level, from the leaf head's prediction mapped to its
    ancestors (the same read-out for both objectives); CPCC of the embedding (``cpcc``) and,
    as step 1 measures it, of each hookable layer's first token (``cpcc@layer<i>``: the CLS
    token of a ViT)."""
    device = next(model.parameters()).device
    images, labels = _images(recipe.n_val, recipe.image_size, recipe.data_seed, "val")
    layers = model.encoder.hook_layers()
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, i=i: captured[i].append(out[:, 0].float().cpu())
        )
        for i, (_, module) in enumerate(layers)
    ]
    embs, preds = [], []
    try:
        for chunk in images.split(512):
            emb, logits = model(chunk.to(device))
            embs.append(emb.cpu())
            preds.append(logits[-1].argmax(dim=1).cpu())
    finally:
        for handle in handles:
            handle.remove()
    emb = torch.cat(embs)
    pred_paths = torch.as_tensor(HIERARCHY.leaf_paths())[torch.cat(preds)]
    out: dict[str, float] = {}
    for level, name in enumerate(HIERARCHY.level_names):
        out[f"acc@{name}"] = float((pred_paths[:, level] == labels[:, level]).float().mean())
    # The leaves' CPCC, as step 1's hier/cpcc measures it.
    tree = torch.as_tensor(HIERARCHY.leaf_distance())
    leaves = labels[:, -1]
    out["cpcc"] = cpcc_of_classes(emb, leaves, tree, "stand-in CPCC")
    for i, feats in captured.items():
        out[f"cpcc@layer{i}"] = cpcc_of_classes(torch.cat(feats), leaves, tree, "stand-in CPCC")
    out["n_val"] = float(len(images))
    return out
