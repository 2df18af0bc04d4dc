"""Control: steer a backbone with one SAE latent and see whether its prediction follows.

For a latent ``j`` with label ``c`` (the class its top images share), clamp ``j`` to a
multiple of its maximum activation over the images of class ``c`` (``clamp_values``: what
the latent reaches when its concept is present) — add ``(value - f_j(x)) * d_j`` to
each hooked token, ``d_j`` the latent's decoder direction in the activations' own units,
which leaves the SAE's reconstruction error in place — run the rest of the backbone, and
read the prediction off its output with a linear readout (a probe on the tower's final
embedding, or the model's own logits). The *hit rate* is the fraction of images not of
class ``c`` whose prediction becomes ``c``; the unedited pass gives its baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hsae.backbones import Backbone
from hsae.cache import ActivationCache
from hsae.errors import HsaeError
from hsae.evaluation.inputs import ImagePass, make_run_backbone, run_configs, run_dataset
from hsae.metrics.hierarchy import LinearProbe, fit_linear_probe
from hsae.sae.base import SparseAutoencoder


@dataclass
class ControlResult:
    hit_rate_k: torch.Tensor
    """Per latent: fraction of images (not of its class) predicted as its class after the edit."""
    baseline_k: torch.Tensor
    """The same fraction without the edit."""
    delta_p_k: torch.Tensor
    """Mean change of the readout probability of the latent's class."""

    def metrics(self, prefix: str = "control/") -> dict[str, float]:
        return {
            f"{prefix}hit_rate": float(self.hit_rate_k.mean()),
            f"{prefix}hit_rate_baseline": float(self.baseline_k.mean()),
            f"{prefix}delta_p": float(self.delta_p_k.mean()),
        }


@torch.no_grad()
def latent_direction(sae: SparseAutoencoder, latent: int) -> torch.Tensor:
    """``decode(e_j) - decode(0)``: what one unit of latent ``j`` adds to an activation, in
    the activations' units (the input scale and any folding included)."""
    codes = torch.zeros(2, sae.n_latents, device=next(sae.parameters()).device)
    codes[1, latent] = 1.0
    out = sae.decode(codes)
    return out[1] - out[0]


def hooked_rows(acts_btd: torch.Tensor, tokens: str, n_prefix_tokens: int) -> torch.Tensor:
    """The tokens of a layer's ``[batch, tokens, d]`` output that an SAE trained with this
    token selection reads, as a view (writing into it edits the layer's output)."""
    if tokens == "cls":
        return acts_btd[:, :1]
    if tokens in ("patch", "mean"):
        return acts_btd[:, n_prefix_tokens:]
    if tokens == "all":
        return acts_btd
    raise HsaeError(f"backbone.tokens={tokens!r} is not valid; choose cls, patch, mean or all")


def clamp_values(
    acts_nk: torch.Tensor,
    labels_n: torch.Tensor,
    latents: Sequence[int],
    latent_classes: Sequence[int],
    multiple: float = 2.0,
) -> list[float]:
    """Per latent, ``multiple`` x its maximum activation (``acts_nk``: one per image, e.g.
    the max over the image's tokens) over the images of its class: the strength its concept
    gives it, so that clamping an image of another class there is the edit "this concept is
    present". The max over all images would also take activations on other classes, which
    say nothing of the concept (and reward impure latents with larger edits); the max over
    other classes is ~0 for a clean latent, which would edit nothing."""
    values = []
    for latent, cls in zip(latents, latent_classes, strict=True):
        own = acts_nk[labels_n == cls, latent]
        peak = float(own.max()) if len(own) else 0.0
        if not peak > 0:
            raise HsaeError(
                f"latent {latent} never fires on an image of its class {cls}: no strength to "
                "clamp it to; choose latents by the classes of their top images (top_class)"
            )
        values.append(multiple * peak)
    return values


def clamp_edit(
    sae: SparseAutoencoder, latent: int, value: float, tokens: str, n_prefix_tokens: int
) -> Callable[[torch.Tensor], None]:
    """An in-place edit of a layer's ``[batch, tokens, d]`` output that sets ``latent`` to
    ``value`` on the rows the SAE was trained on (``tokens``)."""
    direction = latent_direction(sae, latent)

    def edit(acts_btd: torch.Tensor) -> None:
        rows = hooked_rows(acts_btd, tokens, n_prefix_tokens)
        if tokens == "mean":  # the SAE saw the mean patch token: shift every patch equally
            current = sae.encode(rows.float().mean(dim=1))[:, latent]
            rows += ((value - current)[:, None] * direction).to(rows.dtype)[:, None, :]
            return
        flat = rows.reshape(-1, rows.shape[-1]).float()
        current = sae.encode(flat)[:, latent]
        rows += ((value - current)[:, None] * direction).to(rows.dtype).view_as(rows)

    return edit


@torch.no_grad()
def fit_readout(
    backbone: Backbone, images: torch.Tensor, labels_n: torch.Tensor, n_classes: int, layer: int = 0
) -> LinearProbe:
    """A linear readout of the classes from the tower's unedited output."""
    return fit_linear_probe(backbone.forward_edited(images, layer, None), labels_n, n_classes)


@torch.no_grad()
def clamp_hit_rate(
    backbone: Backbone,
    sae: SparseAutoencoder,
    layer: int,
    tokens: str,
    images: torch.Tensor,
    labels_n: torch.Tensor,
    readout: LinearProbe,
    latents: Sequence[int],
    latent_classes: Sequence[int],
    values: Sequence[float],
) -> ControlResult:
    """Steer with each latent in turn over the images not of its class."""
    if not len(latents) == len(latent_classes) == len(values):
        raise HsaeError("latents, latent_classes and values must have the same length")
    base_p = readout.logits(backbone.forward_edited(images, layer, None)).softmax(dim=-1)
    hits, baselines, deltas = [], [], []
    for latent, cls, value in zip(latents, latent_classes, values, strict=True):
        others = labels_n != cls
        if not others.any():
            raise HsaeError(f"every image is of class {cls}; control needs images of other classes")
        edit = clamp_edit(sae, latent, value, tokens, backbone.n_prefix_tokens)
        p = readout.logits(backbone.forward_edited(images[others], layer, edit)).softmax(dim=-1)
        hits.append((p.argmax(dim=-1) == cls).float().mean())
        baselines.append((base_p[others].argmax(dim=-1) == cls).float().mean())
        deltas.append((p[:, cls] - base_p[others, cls]).mean())
    return ControlResult(torch.stack(hits), torch.stack(baselines), torch.stack(deltas))


@torch.no_grad()
def spliced_zero_shot(
    backbone: Backbone,
    sae: SparseAutoencoder,
    layer: int,
    tokens: str,
    images: torch.Tensor,
    labels_n: torch.Tensor,
    class_names: Sequence[str],
    template: str = "a photo of a {}.",
) -> dict[str, float]:
    """CLIP zero-shot accuracy with the hooked rows replaced by the SAE's reconstruction,
    against the original and against zero ablation of those rows: ``fidelity/zero_shot/...``
    and ``fidelity/zero_shot_recovered`` = (spliced - ablated) / (original - ablated)."""
    encode_text = getattr(backbone, "encode_text", None)
    if encode_text is None:
        raise HsaeError(f"{backbone.name} has no text tower; zero-shot needs a CLIP-like backbone")
    text = torch.nn.functional.normalize(
        encode_text([template.format(c) for c in class_names]), dim=-1
    )

    def rows_of(acts_btd: torch.Tensor) -> torch.Tensor:
        return hooked_rows(acts_btd, tokens, backbone.n_prefix_tokens)

    def splice(acts_btd: torch.Tensor) -> None:
        rows = rows_of(acts_btd)
        if tokens == "mean":  # replace the patches' mean by its reconstruction
            mean = rows.float().mean(dim=1)
            rows += (sae(mean).x_hat - mean).to(rows.dtype)[:, None, :]
            return
        flat = rows.reshape(-1, rows.shape[-1]).float()
        rows.copy_(sae(flat).x_hat.to(rows.dtype).view_as(rows))

    def ablate(acts_btd: torch.Tensor) -> None:
        rows_of(acts_btd).zero_()

    accuracy = {}
    for kind, edit in (("original", None), ("spliced", splice), ("ablated", ablate)):
        image = torch.nn.functional.normalize(backbone.forward_edited(images, layer, edit), dim=-1)
        accuracy[kind] = float(((image @ text.T).argmax(dim=-1) == labels_n).float().mean())
    gap = accuracy["original"] - accuracy["ablated"]
    out = {f"fidelity/zero_shot/{k}": v for k, v in accuracy.items()}
    out["fidelity/zero_shot_recovered"] = (
        (accuracy["spliced"] - accuracy["ablated"]) / gap if abs(gap) > 1e-9 else float("nan")
    )
    return out


def control_metrics(
    sae: torch.nn.Module, cache: ActivationCache, images: ImagePass, cfg: dict, split: str,
    n_latents: int = 16, n_images: int = 128, multiple: float = 2.0, level: int = 0,
    seed: int = 0, device: torch.device | str = "cpu", backbone: Any = None,
) -> dict[str, float]:  # fmt: skip
    """Steer the run's backbone with its most label-pure latents (``clamp_hit_rate``): each is
    clamped to ``multiple`` x its maximum activation on images of its own class
    (``clamp_values``), and a linear readout of the tower's output (fit on other images) says whether the prediction
    at hierarchy level ``level`` moves to the latent's class. For a backbone with a text
    tower, also CLIP zero-shot accuracy at that level with the SAE spliced in. ``backbone``:
    the run's backbone when the caller has built it already (``make_run_backbone``)."""
    from hsae.metrics.interp import top_class

    backbone_cfg = run_configs(cfg)[0]
    if backbone is None:
        backbone = make_run_backbone(cfg, device)
    dataset = run_dataset(cfg, split, backbone.preprocess)
    labels_n = torch.as_tensor(cache.labels_nl[images.image_ids, level])
    n_classes = cache.hierarchy.n_classes(level)
    # Each latent's class: the majority label of the images it fires on most.
    acts = images.acts_ik
    top = top_class(acts, labels_n, n_classes, n_top=20)
    eligible = top.n_fired_k >= 5
    order = torch.argsort(torch.where(eligible, top.purity_k, -1.0), descending=True)
    latents = [int(j) for j in order[:n_latents] if eligible[j]]
    if not latents:
        raise HsaeError("no latent fires on 5 or more images; control needs active latents")
    classes = [int(top.class_k[j]) for j in latents]
    values = clamp_values(acts, labels_n, latents, classes, multiple)

    rng = np.random.default_rng(seed)
    order_images = rng.permutation(len(images.image_ids))
    n_fit = min(n_images, len(order_images) // 2)  # half for the readout, half to steer
    fit_idx, test_idx = order_images[:n_fit], order_images[n_fit : n_fit + n_images]
    if n_fit < 2:
        raise HsaeError(f"control needs at least 4 images in the {split} split")

    def load(idx: np.ndarray) -> torch.Tensor:
        return torch.stack([dataset[int(images.image_ids[i])][0] for i in idx]).to(device)

    layer, tokens = backbone_cfg.layer, backbone_cfg.tokens
    readout = fit_readout(backbone, load(fit_idx), labels_n[fit_idx].to(device), n_classes, layer)
    result = clamp_hit_rate(
        backbone, sae, layer, tokens, load(test_idx), labels_n[test_idx].to(device), readout,
        latents, classes, values,
    )  # fmt: skip
    name = cache.hierarchy.level_names[level]
    out = {f"{k}@{name}": v for k, v in result.metrics().items()}
    out["control/n_latents"] = float(len(latents))
    if hasattr(backbone, "encode_text"):  # a CLIP-like backbone: zero-shot with the SAE spliced in
        zero_shot = spliced_zero_shot(
            backbone, sae, layer, tokens, load(test_idx), labels_n[test_idx].to(device),
            list(cache.hierarchy.class_names[level]),
        )  # fmt: skip
        out |= {f"{k}@{name}": v for k, v in zero_shot.items()}
    return out
