"""What evaluation reads: the run's ``cfg.json``, its backbone, and one pass over a cache.

``image_pass`` turns the cached rows into per-image tensors (the latents' maximum over an
image's rows, the SAE's inputs and reconstructions averaged over them) that every step-3
metric family reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae import rundir
from hsae.cache import ActivationCache
from hsae.config import BackboneConfig, DatasetConfig
from hsae.errors import HsaeError
from hsae.sae.metrics import make_sae_metrics

# What evaluation reads from a run's cfg.json (train.py writes these and more).
RUN_CFG_KEYS = ("sae", "cache", "backbone", "dataset")


def read_run_cfg(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise HsaeError(f"run_dir={run_dir} does not exist; pass the folder a train.py run wrote")
    for name in (rundir.WEIGHTS, rundir.CFG):
        if not (run_dir / name).exists():
            raise HsaeError(
                f"run_dir={run_dir} has no {name}: the training run did not finish "
                "(rerun it with the same hydra.run.dir to resume), or this is not a run dir"
            )
    path = rundir.RunDir(run_dir).cfg
    rewrite = (
        "train.py writes it when a run finishes: rerun train.py with this hydra.run.dir and "
        "skip_finished=false (it resumes from checkpoints/last.ckpt), or restore the file"
    )
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise HsaeError(f"{path} is not valid JSON ({e}): it is damaged; {rewrite}") from None
    missing = [key for key in RUN_CFG_KEYS if key not in cfg] if isinstance(cfg, dict) else None
    if missing is None or missing:
        what = "is not a JSON object" if missing is None else f"has no {missing}"
        raise HsaeError(f"{path} {what}: it is damaged or not a run's config; {rewrite}")
    return cfg


def run_configs(cfg: dict) -> tuple[BackboneConfig, DatasetConfig]:
    """``cfg.json``'s backbone and dataset as typed configs: the one place they are rebuilt."""
    return BackboneConfig(**cfg["backbone"]), DatasetConfig(**cfg["dataset"])


def run_dataset(cfg: dict, split: str, transform: Any) -> Any:
    """The run's dataset split, its images through ``transform`` (None: as stored)."""
    from hsae.data import make_dataset

    dataset = make_dataset(run_configs(cfg)[1], split)
    dataset.transform = transform
    return dataset


def make_run_backbone(cfg: dict, device: torch.device | str) -> Any:
    """The run's backbone (``cfg.json``'s ``backbone``), on ``device``."""
    from hsae.backbones import make_backbone

    backbone = make_backbone(run_configs(cfg)[0])
    backbone.model.to(device)
    return backbone


@dataclass
class ImagePass:
    """What one pass over a cache gives, per image (rows grouped by image)."""

    sae_metrics: dict[str, float]
    acts_ik: torch.Tensor  # max activation of each latent over the image's rows
    feats_id: torch.Tensor  # mean SAE input over the image's rows
    recon_id: torch.Tensor  # mean reconstruction over the image's rows
    image_ids: np.ndarray
    moran_k: torch.Tensor | None = None
    notes: dict[str, str] = field(default_factory=dict)


def patch_grid(cache: ActivationCache) -> tuple[int, int] | None:
    """``(h, w)`` when the rows are exactly a square grid of patch tokens per image."""
    token_index = cache.manifest["token_index"]
    side = math.isqrt(len(token_index))
    contiguous = token_index == list(range(token_index[0], token_index[0] + len(token_index)))
    is_patch = cache.manifest["spec"].get("tokens") == "patch"
    return (side, side) if is_patch and side * side == len(token_index) and contiguous else None


def ragged_images(cache: ActivationCache) -> tuple[np.ndarray, np.ndarray]:
    """``(first row, end row)`` of each image of a ragged cache (``tokens=segments``: a
    different number of rows per image, each image's rows contiguous)."""
    image_r = cache.row_image(np.arange(cache.n_rows))
    starts = np.flatnonzero(np.r_[True, image_r[1:] != image_r[:-1]])
    return starts, np.r_[starts[1:], cache.n_rows]


def image_features(cache: ActivationCache) -> tuple[torch.Tensor, np.ndarray]:
    """Each image's mean row ``[images, d]`` and its dataset index, fixed or ragged."""
    tokens_per_image = cache.manifest["tokens_per_image"]
    rows_rd = cache.load_all()
    if tokens_per_image:
        feats = rows_rd.view(-1, tokens_per_image, cache.d_model).mean(dim=1)
        return feats, cache.row_image(np.arange(0, cache.n_rows, tokens_per_image))
    starts, ends = ragged_images(cache)
    image_r = torch.as_tensor(np.repeat(np.arange(len(starts)), ends - starts))
    feats = torch.zeros(len(starts), cache.d_model).index_add_(0, image_r, rows_rd.float())
    return feats / torch.as_tensor(ends - starts).unsqueeze(1), cache.row_image(starts)


@torch.no_grad()
def _ragged_image_pass(
    sae: torch.nn.Module, cache: ActivationCache, batch_size: int, device: torch.device
) -> ImagePass:
    """``image_pass`` for a ragged cache: batches of whole images, each image's maximum
    code and mean input/reconstruction by scatter over its rows."""
    starts, ends = ragged_images(cache)
    metrics = make_sae_metrics(sae.d_model, sae.n_latents).to(device)
    n_images = len(starts)
    acts = torch.empty(n_images, sae.n_latents)
    feats = torch.empty(n_images, sae.d_model)
    recons = torch.empty(n_images, sae.d_model)
    first = 0
    while first < n_images:  # as many whole images as fit in batch_size rows (at least one)
        last = max(first + 1, int(np.searchsorted(ends, starts[first] + batch_size, "right")))
        rows = np.arange(starts[first], ends[last - 1])
        counts = torch.as_tensor(ends[first:last] - starts[first:last], device=device)
        image_r = torch.repeat_interleave(torch.arange(last - first, device=device), counts)
        x = cache.read(rows).to(device)
        out = sae(x)
        metrics.update(x, out.x_hat, out.codes)
        for target, values_rc, reduce in ((acts, out.codes, "amax"), (feats, x, "mean"),
                                          (recons, out.x_hat, "mean")):  # fmt: skip
            per_image = torch.zeros(last - first, values_rc.shape[1], device=device)
            per_image.index_reduce_(0, image_r, values_rc.float(), reduce, include_self=False)
            target[first:last] = per_image.cpu()
        first = last
    return ImagePass(
        sae_metrics={name: float(value) for name, value in metrics.compute().items()},
        acts_ik=acts,
        feats_id=feats,
        recon_id=recons,
        image_ids=cache.row_image(starts),
        moran_k=None,
        notes={"interp/moran_i": "needs patch-token rows (backbone.tokens=patch)"},
    )


@torch.no_grad()
def image_pass(
    sae: torch.nn.Module, cache: ActivationCache, batch_size: int, device: torch.device
) -> ImagePass:
    from hsae.metrics.interp import MoranAccumulator

    tokens_per_image = cache.manifest["tokens_per_image"]
    if not tokens_per_image:  # tokens=segments: a different number of rows per image
        return _ragged_image_pass(sae, cache, batch_size, device)
    rows_per_batch = max(1, batch_size // tokens_per_image) * tokens_per_image
    metrics = make_sae_metrics(sae.d_model, sae.n_latents).to(device)
    grid = patch_grid(cache)
    moran = MoranAccumulator(sae.n_latents, grid, device) if grid else None
    # Filled in place: a list of batches and its concatenation would hold the [images x
    # latents] activations twice (2 x 4.9 GB at 50,000 images x 24,576 latents).
    n_images = cache.n_rows // tokens_per_image
    acts = torch.empty(n_images, sae.n_latents)
    feats = torch.empty(n_images, sae.d_model)
    recons = torch.empty(n_images, sae.d_model)
    for start in range(0, cache.n_rows, rows_per_batch):
        rows = np.arange(start, min(start + rows_per_batch, cache.n_rows))
        x = cache.read(rows).to(device)
        out = sae(x)
        metrics.update(x, out.x_hat, out.codes)
        n_img, first = len(rows) // tokens_per_image, start // tokens_per_image
        images = slice(first, first + n_img)
        codes = out.codes.float().view(n_img, tokens_per_image, -1)
        acts[images] = codes.amax(dim=1).cpu()
        feats[images] = x.view(n_img, tokens_per_image, -1).mean(dim=1).cpu()
        recons[images] = out.x_hat.float().view(n_img, tokens_per_image, -1).mean(dim=1).cpu()
        if moran is not None:
            moran.update(codes)
    notes = {} if grid else {"interp/moran_i": "needs patch-token rows (backbone.tokens=patch)"}
    return ImagePass(
        sae_metrics={name: float(value) for name, value in metrics.compute().items()},
        acts_ik=acts,
        feats_id=feats,
        recon_id=recons,
        image_ids=cache.row_image(np.arange(0, cache.n_rows, tokens_per_image)),
        moran_k=moran.compute().cpu() if moran else None,
        notes=notes,
    )


def _on_gpu(images: ImagePass, device: torch.device) -> ImagePass:
    """The per-image tensors on the GPU, where the metrics (batched torch, on their inputs'
    device) run fastest, when they take at most half of its free memory; else unchanged."""
    if device.type != "cuda":
        return images
    tensors = (images.acts_ik, images.feats_id, images.recon_id)
    if sum(t.numel() * t.element_size() for t in tensors) > torch.cuda.mem_get_info(device)[0] / 2:
        return images
    acts, feats, recons = (t.to(device) for t in tensors)
    return replace(images, acts_ik=acts, feats_id=feats, recon_id=recons)


def latent_groups(sae: torch.nn.Module) -> list[tuple[int, int]] | None:
    """Matryoshka groups: the latent index ranges between successive prefix ends."""
    ends = list(getattr(sae, "ends", []) or [])
    return list(zip([0, *ends[:-1]], ends, strict=True)) if ends else None
