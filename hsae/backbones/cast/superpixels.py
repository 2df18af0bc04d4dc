"""Superpixels for CAST's tokens: SLIC (scikit-image) by default, SEEDS (OpenCV contrib)
when ``cv2.ximgproc`` is importable, with the settings of the authors' data pipelines.

Both run on one ``[3, H, W]`` image in [0, 1] (after resize and crop, before
normalisation) and return ``[H, W]`` int64 labels ``0..n-1`` that cover every pixel. They
run inside the data pipeline's worker processes (``CastBackbone.resize_crop``).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from hsae.errors import HsaeError

METHODS = ("auto", "slic", "seeds")


@cache
def seeds_available() -> bool:
    try:
        import cv2

        return hasattr(cv2, "ximgproc")
    except ImportError:
        return False


def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise HsaeError(f"superpixels={method!r} is not valid; choose one of {', '.join(METHODS)}")
    if method == "auto":
        return "seeds" if seeds_available() else "slic"
    if method == "seeds" and not seeds_available():
        raise HsaeError(
            "superpixels=seeds needs OpenCV's contrib modules (cv2.ximgproc): "
            "pip install opencv-contrib-python-headless, or use superpixels=slic"
        )
    return method


def _to_hwc_uint8(image_3hw: torch.Tensor) -> np.ndarray:
    return (image_3hw.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def slic_labels(image_3hw: torch.Tensor, n_segments: int, compactness: float = 10.0) -> np.ndarray:
    """SLIC in CIELAB as the authors run it: compactness 10, tripled while SLIC returns
    fewer than half the segments asked for (flat images)."""
    from skimage.segmentation import slic

    pixels = image_3hw.permute(1, 2, 0).double().numpy()
    while True:
        labels = slic(
            pixels, n_segments=n_segments, compactness=compactness, convert2lab=True, start_label=0
        )
        if np.unique(labels).size >= n_segments // 2 or compactness > 1e4:
            return labels
        compactness *= 3


def seeds_labels(image_3hw: torch.Tensor, n_segments: int) -> np.ndarray:
    """OpenCV SEEDS on the CIELAB image with the authors' settings (1 level, prior 2,
    15 histogram bins, 20 iterations)."""
    import cv2

    lab = cv2.cvtColor(_to_hwc_uint8(image_3hw), cv2.COLOR_RGB2LAB)
    h, w, c = lab.shape
    seeds = cv2.ximgproc.createSuperpixelSEEDS(
        w,
        h,
        c,
        num_superpixels=n_segments,
        num_levels=1,
        prior=2,
        histogram_bins=15,
        double_step=False,
    )
    seeds.iterate(lab, num_iterations=20)
    return seeds.getLabels()


def superpixels(image_3hw: torch.Tensor, n_segments: int, method: str = "auto") -> torch.Tensor:
    """``[H, W]`` labels ``0..n-1`` (consecutive: every id names a non-empty segment)."""
    method = resolve_method(method)
    labels = (
        seeds_labels(image_3hw, n_segments)
        if method == "seeds"
        else slic_labels(image_3hw, n_segments)
    )
    # Consecutive ids, so token counts equal segment counts.
    _, consecutive = np.unique(labels, return_inverse=True)
    return torch.from_numpy(consecutive.reshape(labels.shape).astype(np.int64))
