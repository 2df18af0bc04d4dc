"""Reference image embeddings for the MonoSemanticity score (``interp/ms``).

Pach et al. (2025) score a latent by how alike its highly activating images are in the
embedding of a separate image encoder, the same for every backbone compared (they use
DINOv2). The reference must not be one of the backbones under study, or MS favours it.
``evaluate.py run_dir=... reference=<spec>`` takes:

- ``edges`` (default, offline): a fixed, training-free descriptor of edge-orientation
  statistics (``edge_orientation_embedding``). It sees the outlines of what is in the
  image, wherever it is and however it is rotated, and is blind to colour and brightness;
  it learnt nothing, so it favours no backbone.
- ``pixels``: the image at 16 x 16 (``pixel_embedding``). It sees the colour and brightness
  layout, so on the synthetic shapes only colour- (and position-) selective latents score
  above random ones; kept for comparison with earlier runs.
- ``backbone:<config name>``: the pooled output (the image tower's embedding) of any
  ``conf/backbone`` config, e.g. ``backbone:dinov2_vit_b14`` as in the paper, where its
  weights exist.
- ``none``: no MS.

Every reference is standardised per dimension over the evaluated images, so MS measures
how alike the images are relative to the split (a random latent scores about 0).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hsae.config import REFERENCE_BACKBONE_PREFIX, check_reference
from hsae.errors import HsaeError

log = logging.getLogger(__name__)

# conf/ beside the package (train.py and evaluate.py compose from it).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def standardise(emb_ne: torch.Tensor) -> torch.Tensor:
    """Each dimension centred and scaled to unit variance over the images (constant ones 0)."""
    emb = emb_ne.double()
    return ((emb - emb.mean(dim=0)) / emb.std(dim=0).clamp_min(1e-6)).float()


# ---------------------------------------------------------------------------------------
# Fixed descriptors
# ---------------------------------------------------------------------------------------


def _square(images_n3hw: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side resized to ``size`` (antialiased), centre crop ``size`` x ``size``."""
    h, w = images_n3hw.shape[-2:]
    if (h, w) == (size, size):
        return images_n3hw
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    out = F.interpolate(images_n3hw, size=new_hw, mode="bilinear", antialias=True)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    return out[..., top : top + size, left : left + size]


def _gaussian_blur(gray_nhw: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=gray_nhw.dtype, device=gray_nhw.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = gray_nhw[:, None]
    # Separable: rows then columns, reflect padding (no dark frame at the border).
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def edge_orientation_embedding(
    images_n3hw: torch.Tensor,
    size: int = 64,
    sigmas: Sequence[float] = (1.0, 2.0, 4.0),
    n_harmonics: int = 12,
    power: float = 3.0,
    n_bins: int = 72,
) -> torch.Tensor:
    """``[n, len(sigmas) * n_harmonics]``: a rotation-invariant histogram of oriented
    gradients of the whole image, at several scales. Per image (RGB in [0, 1], squared to
    ``size`` x ``size`` and turned to luma) and scale ``s``: Gaussian blur of width ``s``
    pixels, gradients by central differences, orientation ``theta`` and magnitude ``m``;
    then for ``h = 1 .. n_harmonics``

        z_h = sum_pixels m^power e^{2 i h theta} / sum_pixels m^power,

    the circular Fourier coefficients of the magnitude-weighted histogram of edge
    orientations (``2 theta``: an edge's orientation, whichever side is brighter; computed
    from a histogram of ``n_bins`` bins, each pixel shared by its two nearest). The
    feature is ``log(|z_h| + 1e-3)``. Pooling over every pixel makes it blind to where the
    object is; taking ``|z_h|`` to its rotation; dividing by the total weight to contrast,
    hence to colour and brightness. ``power`` 3 lets the strong edges of outlines outweigh
    a smooth background and pixel noise. What is left is the shape of the outlines: how
    many directions their edges take and how sharply (a circle: every direction; a square:
    2 at 90 degrees; a hexagon: 3 at 60; a star: 5)."""
    if images_n3hw.ndim != 4 or images_n3hw.shape[1] != 3:
        raise HsaeError(
            f"edge_orientation_embedding takes [n, 3, h, w] RGB images, got "
            f"{tuple(images_n3hw.shape)}"
        )
    rgb = _square(images_n3hw.float(), size)
    luma = torch.tensor([0.299, 0.587, 0.114], device=rgb.device).view(1, 3, 1, 1)
    gray = (rgb * luma).sum(dim=1)
    if n_bins < 2 * n_harmonics + 1:
        raise HsaeError(f"n_bins={n_bins} must be > 2 * n_harmonics={2 * n_harmonics}")
    n = gray.shape[0]
    out = []
    for sigma in sigmas:
        gy, gx = torch.gradient(_gaussian_blur(gray, sigma), dim=(1, 2))
        weight = torch.hypot(gx, gy).pow(power).flatten(1)  # [n, p]
        # The histogram of 2 theta over n_bins, each pixel split between its two nearest
        # bins, then its circular Fourier coefficients: a HOG of the whole image.
        pos = (torch.atan2(gy, gx).flatten(1) / math.pi % 1.0) * n_bins  # 2 theta / 2 pi
        low = pos.floor()
        upper = pos - low
        low = low.long() % n_bins
        hist = torch.zeros(n, n_bins, device=gray.device)
        hist.scatter_add_(1, low, weight * (1 - upper))
        hist.scatter_add_(1, (low + 1) % n_bins, weight * upper)
        z = torch.fft.rfft(hist, dim=1)[:, 1 : n_harmonics + 1]
        out.append(torch.log(z.abs() / hist.sum(dim=1, keepdim=True).clamp_min(1e-30) + 1e-3))
    return torch.cat(out, dim=1)


def pixel_embedding(images_n3hw: torch.Tensor, size: int = 16) -> torch.Tensor:
    """``[n, 3 * size * size]``: the images area-averaged to ``size`` x ``size``. Sees the
    colour and brightness layout (where the bright, red, ... parts are), not shape."""
    return F.interpolate(
        _square(images_n3hw.float(), 4 * size), size=(size, size), mode="area"
    ).flatten(1)


# ---------------------------------------------------------------------------------------
# A backbone as the reference
# ---------------------------------------------------------------------------------------


def backbone_config(name: str) -> Any:
    """The ``BackboneConfig`` of ``conf/backbone/<name>.yaml``, composed by Hydra like
    ``evaluate.py backbone=<name>`` (inside a running Hydra app, from its search path)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    from hsae.config import register_configs

    register_configs()
    overrides = [f"backbone={name}", "run_dir=reference"]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="evaluate", overrides=overrides)
        else:
            if not CONF_DIR.is_dir():
                raise HsaeError(
                    f"reference=backbone:{name} needs hsae's conf/ folder, not found at {CONF_DIR}"
                )
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="evaluate", overrides=overrides)
    except MissingConfigException:
        cfg = None
    if cfg is None or cfg.backbone is None:  # evaluate.yaml's backbone group is optional
        known = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
        raise HsaeError(
            f"reference=backbone:{name}: no backbone config {name!r}; valid: {', '.join(known)}"
        )
    return OmegaConf.to_object(cfg.backbone)


@torch.no_grad()
def _backbone_embedding(
    name: str, dataset: Any, image_ids: np.ndarray, device: torch.device, batch_size: int
) -> torch.Tensor:
    from hsae.backbones import make_backbone

    cfg = backbone_config(name)
    backbone = make_backbone(cfg)
    backbone.model.to(device).eval()
    dataset.transform = backbone.preprocess
    out = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start : start + batch_size]
        batch = torch.stack([dataset[int(i)][0] for i in ids]).to(device)
        out.append(backbone.forward_edited(batch, cfg.layer, None).float().flatten(1).cpu())
    return torch.cat(out)


def _as_tensor_image(image: Any) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image.float()
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image.convert("RGB") if hasattr(image, "convert") else image)


def reference_embedding(
    reference: str,
    run_cfg: dict,
    split: str,
    image_ids: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor | None:
    """The standardised ``[n_images, e]`` reference embedding of the run's images
    (``run_cfg``: the run dir's ``cfg.json``), in ``image_ids`` order; None for ``none``."""
    check_reference(reference)
    if reference == "none":
        return None
    from hsae.config import DatasetConfig
    from hsae.data import make_dataset

    dataset = make_dataset(DatasetConfig(**run_cfg["dataset"]), split)
    image_ids = np.asarray(image_ids)
    if reference.startswith(REFERENCE_BACKBONE_PREFIX):
        name = reference[len(REFERENCE_BACKBONE_PREFIX) :]
        if name == run_cfg.get("backbone", {}).get("name"):
            log.warning(
                "reference=%s is the backbone under study: MS then favours this backbone over "
                "the others; compare backbones with one reference that is none of them",
                reference,
            )
        emb = _backbone_embedding(name, dataset, image_ids, torch.device(device), batch_size)
        return standardise(emb)
    dataset.transform = None
    embed = edge_orientation_embedding if reference == "edges" else pixel_embedding
    out = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start : start + batch_size]
        images = [_as_tensor_image(dataset[int(i)][0]) for i in ids]
        if len({tuple(im.shape) for im in images}) == 1:
            out.append(embed(torch.stack(images)))
        else:  # image files of different sizes: one at a time (each is squared first)
            out.append(torch.cat([embed(im[None]) for im in images]))
    return standardise(torch.cat(out))
