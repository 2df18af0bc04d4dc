"""Superpixels for CAST's tokens: SLIC (scikit-image) by default, SEEDS (OpenCV contrib)
when ``cv2.ximgproc`` is importable, with the settings of the authors' data pipelines.

Both run on one ``[3, H, W]`` image in [0, 1] (after resize and crop, before
normalisation) and return ``[H, W]`` int64 labels ``0..n-1`` that cover every pixel. They
run inside the data pipeline's worker processes (``CastBackbone.resize_crop``).
"""

from __future__ import annotations

import math
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


@cache
def seeds_request(width: int, height: int, n_segments: int) -> int:
    """The ``num_superpixels`` to ask SEEDS for so that it makes about ``n_segments``.
    SEEDS lays a grid of blocks that must tile the image, so it returns fewer than asked
    for most sizes (196 asked at 256 px gives 144; at 224 px, the authors' setting, 196
    exactly). Requests of growing square numbers, until one reaches ``n_segments``; the
    one whose count is closest wins (the count is known before iterating, so this costs
    a few milliseconds, once per image size and process)."""
    import cv2

    def count(k: int) -> int:
        algo = cv2.ximgproc.createSuperpixelSEEDS(width, height, 3, k, 1, 2, 15, False)
        return int(algo.getNumberOfSuperpixels())

    side = math.isqrt(n_segments)
    candidates = [n_segments] + [s * s for s in range(side + 1, math.isqrt(4 * n_segments) + 1)]
    best, best_count = n_segments, count(n_segments)
    for k in candidates[1:]:
        if best_count >= n_segments:
            break
        got = count(k)
        if abs(got - n_segments) < abs(best_count - n_segments):
            best, best_count = k, got
        if got >= n_segments:
            break
    return best


def seeds_labels(image_3hw: torch.Tensor, n_segments: int) -> np.ndarray:
    """OpenCV SEEDS on the CIELAB image with the authors' settings (1 level, prior 2,
    15 histogram bins, 20 iterations), asked for ``seeds_request``'s count."""
    import cv2

    lab = cv2.cvtColor(_to_hwc_uint8(image_3hw), cv2.COLOR_RGB2LAB)
    h, w, c = lab.shape
    seeds = cv2.ximgproc.createSuperpixelSEEDS(
        w,
        h,
        c,
        num_superpixels=seeds_request(w, h, n_segments),
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


def kmeans_superpixels(
    images_b3hw: torch.Tensor, n_side: int, iters: int = 5, compactness: float = 1.0
) -> torch.Tensor:
    """Batched SLIC-like superpixels in torch, for small images inside a training loop
    (SLIC per image per step would cost more than the model): k-means over (colour,
    position) starting from an ``n_side x n_side`` grid of centres. Position is measured
    in grid steps times ``compactness``, colour as given (e.g. normalised pixels). Every
    pixel is assigned over all centres (fine for the few hundred pixels of a stand-in's
    image). Returns ``[B, H, W]`` ids in ``0..n_side**2 - 1``; ids may be unused."""
    b, _, h, w = images_b3hw.shape
    step_y, step_x = h / n_side, w / n_side
    ys = (torch.arange(h, device=images_b3hw.device, dtype=images_b3hw.dtype) + 0.5) / step_y
    xs = (torch.arange(w, device=images_b3hw.device, dtype=images_b3hw.dtype) + 0.5) / step_x
    pos = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(1, h * w, 2)
    pixels = torch.cat(
        [images_b3hw.flatten(2).transpose(1, 2), compactness * pos.expand(b, -1, -1)], dim=-1
    )  # [b, h*w, 5]
    grid = (torch.arange(n_side, device=pixels.device, dtype=pixels.dtype) + 0.5) * step_y
    gy, gx = torch.meshgrid(grid.long(), grid.long(), indexing="ij")
    centres = pixels[:, (gy * w + gx).reshape(-1)]  # [b, k, 5]
    with torch.no_grad():
        for _ in range(iters):
            labels = torch.cdist(pixels, centres).argmin(dim=-1)  # [b, h*w]
            one_hot = torch.nn.functional.one_hot(labels, centres.shape[1]).to(pixels.dtype)
            counts = one_hot.sum(1)[..., None]
            centres = torch.where(
                counts > 0, one_hot.transpose(1, 2) @ pixels / counts.clamp(min=1), centres
            )
        labels = torch.cdist(pixels, centres).argmin(dim=-1)
    return labels.view(b, h, w)
