"""Thumbnails, heatmaps and the W&B picture of the browser.

A thumbnail is written once per image that some latent shows (``thumbs/<row // 1000>/<row>``,
WebP), however many latents show it, and the page loads only those of the latents on
screen. A heatmap is a latent's activation on each patch of one of its top images, as
``uint8`` relative to the latent's largest activation (so the heatmaps of one latent
compare), drawn by the page over the thumbnail; it is computed for the shown images only,
a batch of images at a time.

Segment tokens (CAST's ``tokens=segments``) have no patch grid: there a heatmap is the
latent's activation on each of the image's segment tokens (a vector indexed by token id),
and each shown image gets one segment map (``segs/<row // 1000>/<row>.js``: the token id of
every cell of the model's stem grid); the page paints each cell with its segment's value
(``paint_segments`` does the same for the W&B picture).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hsae.browser.stats import LatentTable
from hsae.errors import HsaeError

log = logging.getLogger(__name__)

THUMBS = "thumbs"
SEGS = "segs"
ImageLoader = Callable[[int], "np.ndarray | None"]
"""Image row -> ``uint8 [H, W, 3]`` as the backbone saw it (after its resize and crop), or
None when the image cannot be read (the page shows a blank)."""
PatchMaps = Callable[[np.ndarray, np.ndarray, np.ndarray], torch.Tensor]
"""``(image_rows [b], pair_image [m], pair_latent [m]) -> [m, h*w]``: latent
``pair_latent[j]``'s activation on every patch of image ``image_rows[pair_image[j]]``."""


SegmentMaps = Callable[[np.ndarray], np.ndarray]
"""``image_rows [b] -> int [b, h, w]``: the token id (at the hooked stage) of every
stem-grid cell of each image; -1 where no token covers a cell."""


@dataclass(frozen=True)
class SegmentHeat:
    """Heatmaps over segment tokens: ``values`` as ``PatchMaps`` but ``[m, n_tokens]`` (each
    pair's activation on every token id of its image, 0 for ids the image lacks), and the
    segment map of each shown image."""

    values: PatchMaps
    maps: SegmentMaps
    grid_hw: tuple[int, int]
    n_tokens: int
    stage: int  # the hooked stage (0: superpixels), for the page's note


def thumb_path(row: int, ext: str) -> str:
    return f"{THUMBS}/{row // 1000}/{row}.{ext}"


def segs_path(row: int) -> str:
    return f"{SEGS}/{row // 1000}/{row}.js"


def seg_dtype(n_tokens: int) -> np.dtype:
    """One byte per cell while token ids fit below the "no token" value, else two."""
    return np.dtype(np.uint8) if n_tokens < 255 else np.dtype("<u2")


def paint_segments(ids_hw: np.ndarray, heat_t: np.ndarray) -> np.ndarray:
    """``uint8 [h, w]``: each cell painted with the heat of the token it belongs to (0 where
    no token covers it) — what the page draws from a segment map and a heat vector."""
    ids = np.asarray(ids_hw, np.int64)
    inside = (ids >= 0) & (ids < len(heat_t))
    return np.where(inside, np.asarray(heat_t)[np.where(inside, ids, 0)], 0).astype(np.uint8)


def write_segment_maps(
    out_dir: Path, rows: np.ndarray, seg: SegmentHeat, batch: int = 4096
) -> None:
    """One segment map per image row (``segs_path``: ``hsaeData("<base64 ids>")``, row-major
    on ``seg.grid_hw``, the "no token" value for uncovered cells)."""
    dtype = seg_dtype(seg.n_tokens)
    none = np.iinfo(dtype).max
    for sub in np.unique(np.asarray(rows) // 1000):
        (out_dir / SEGS / str(int(sub))).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), batch):
        chunk = np.asarray(rows[start : start + batch])
        maps = np.asarray(seg.maps(chunk))
        if maps.shape != (len(chunk), *seg.grid_hw):
            raise HsaeError(
                f"segment maps of shape {maps.shape}, expected {(len(chunk), *seg.grid_hw)}"
            )
        for row, ids in zip(chunk.tolist(), maps, strict=True):
            cells = np.where((ids >= 0) & (ids < seg.n_tokens), ids, none).astype(dtype)
            text = base64.b64encode(cells.tobytes()).decode()
            (out_dir / segs_path(row)).write_text(f"hsaeData({json.dumps(text)});\n")


def as_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float in [0, 1] (or ``[H, W, 3]`` uint8) -> ``uint8 [H, W, 3]`` 0..255
    (W&B and PIL read floats as 0..1 or 0..255 depending on the call: uint8 is unambiguous)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if image.dtype == np.uint8:
        return image
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_thumbnails(
    out_dir: Path, rows: np.ndarray, load: ImageLoader, size: int, ext: str = "webp",
    workers: int | None = None,
) -> int:  # fmt: skip
    """One thumbnail (longest side ``size``) per image row; returns how many were written.
    Threads: decoding, resizing and encoding release the GIL."""
    for sub in np.unique(np.asarray(rows) // 1000):
        (out_dir / THUMBS / str(int(sub))).mkdir(parents=True, exist_ok=True)
    fmt = {"webp": "WEBP", "png": "PNG"}[ext]

    def one(row: int) -> bool:
        image = load(int(row))
        if image is None:
            return False
        thumb = Image.fromarray(as_uint8_image(image))
        thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
        kwargs = (
            {"quality": 80, "method": 2} if fmt == "WEBP" else {}
        )  # method 4+: 2x slower, same size
        thumb.save(out_dir / thumb_path(int(row), ext), fmt, **kwargs)
        return True

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, rows.tolist(), chunksize=64))


def heatmaps(
    table: LatentTable, patch_maps: PatchMaps, n_patches: int, batch_images: int
) -> np.ndarray:
    """``uint8 [n_latents, n_show, n_patches]``: each shown image's patch activations of the
    latent, over the latent's largest shown activation, ``batch_images`` images at a time
    (segment tokens: ``n_patches`` token ids)."""
    n_latents, n_show = table.show_row_ks.shape
    heat = np.zeros((n_latents, n_show, n_patches), np.uint8)
    flat_rows = table.show_row_ks.ravel()
    slots = np.flatnonzero(flat_rows >= 0)
    slots = slots[np.argsort(flat_rows[slots], kind="stable")]  # grouped by image
    rows_sorted = flat_rows[slots]
    images = np.unique(rows_sorted)
    top = np.maximum(table.show_value_ks[:, 0], 1e-30)
    for start in range(0, len(images), batch_images):
        batch = images[start : start + batch_images]
        lo = np.searchsorted(rows_sorted, batch[0], side="left")
        hi = np.searchsorted(rows_sorted, batch[-1], side="right")
        chunk = slots[lo:hi]
        latent = chunk // n_show
        pair_image = np.searchsorted(batch, rows_sorted[lo:hi])
        maps = patch_maps(batch, pair_image, latent).float().cpu().numpy()
        scaled = np.clip(maps / top[latent][:, None] * 255 + 0.5, 0, 255).astype(np.uint8)
        heat[latent, chunk % n_show] = scaled
    return heat


_RED = np.array([230, 30, 20], np.float32)


CellMaps = Callable[[int, int], "np.ndarray | None"]
"""``(latent, slot) -> uint8 [h, w]`` heat cells of that shown image, or None."""


def overlay(image: np.ndarray, cells_hw: np.ndarray) -> np.ndarray:
    """The heat cells blended over a ``uint8 [H, W, 3]`` image (red, alpha = activation)."""
    h, w = image.shape[:2]
    cells = Image.fromarray(np.ascontiguousarray(cells_hw, np.uint8))
    cells_hw1 = np.asarray(cells.resize((w, h), Image.Resampling.BILINEAR), np.float32)[..., None]
    alpha = 0.7 * cells_hw1 / 255
    return (image.astype(np.float32) * (1 - alpha) + _RED * alpha + 0.5).astype(np.uint8)


def wandb_grid(
    out_path: Path, table: LatentTable, latents: list[int], captions: list[str],
    out_dir: Path, ext: str, cells: CellMaps | None, n_images: int = 6, cell: int = 64,
) -> Path:  # fmt: skip
    """A PNG (``uint8``, 0..255): one row per latent, its top images (with their heatmaps,
    ``cells``, when there are any) after a caption cell."""
    label_w = 3 * cell
    canvas = Image.new("RGB", (label_w + n_images * cell, max(1, len(latents)) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (latent, caption) in enumerate(zip(latents, captions, strict=True)):
        y = i * cell
        draw.multiline_text((4, y + 4), caption, fill=(0, 0, 0))
        for s in range(min(n_images, table.show_row_ks.shape[1])):
            row = int(table.show_row_ks[latent, s])
            path = out_dir / thumb_path(row, ext)
            if row < 0 or not path.exists():
                continue
            with Image.open(path) as thumb:
                image = np.asarray(thumb.convert("RGB").resize((cell, cell)))
            heat_hw = cells(latent, s) if cells is not None else None
            if heat_hw is not None:
                image = overlay(image, heat_hw)
            canvas.paste(Image.fromarray(image), (label_w + s * cell, y))
    canvas.save(out_path, "PNG")
    return out_path
