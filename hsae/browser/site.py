"""Writes one browser folder: the static app, the paged data, thumbnails, the W&B picture.

Layout (``FORMAT`` 2)::

    index.html, app.js, style.css        the app (vanilla JS, no build step, no network)
    data/index.js                        every latent's numbers, column by column, + run info
    data/latents-NNNNN.js                ``shard_size`` latents each: top images, activations,
                                         heatmaps, label distribution at every level
    thumbs/<row // 1000>/<row>.webp      one thumbnail per image some latent shows
    segs/<row // 1000>/<row>.js          segment tokens: each shown image's segment map
    wandb_top_images.png                 the purest latents' top images (also in W&B)
    manifest.json                        what was built (written last)

The data files are JSON wrapped in a call, ``hsaeData({...});``, loaded with ``<script>``
tags: browsers refuse ``fetch`` of ``file://`` URLs, so this is what lets the page work
opened straight from disk as well as from any static server. Strip the wrapper to read
them as JSON. The folder is built beside its final name and renamed into place.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from hsae.browser.media import (
    CellMaps,
    ImageLoader,
    PatchMaps,
    SegmentHeat,
    heatmaps,
    paint_segments,
    seg_dtype,
    wandb_grid,
    write_segment_maps,
    write_thumbnails,
)
from hsae.browser.stats import LatentTable
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy

log = logging.getLogger(__name__)

FORMAT = 2  # 2: segment-token heatmaps (``segs/``)
MANIFEST = "manifest.json"
APP_FILES = ("index.html", "app.js", "style.css")
WANDB_GRID = "wandb_top_images.png"


@dataclass
class SiteInputs:
    title: str
    hierarchy: Hierarchy
    table: LatentTable
    labels_nl: np.ndarray
    """Labels of each image row of the activations."""
    names: dict[int, tuple[str, float]] = field(default_factory=dict)
    """Automatic name and its score per latent (``eval.json``'s ``latents`` table)."""
    structure: dict[str, Any] | None = None
    """``{"kind": "matryoshka", "groups": [[start, stop], ...]}`` or ``{"kind":
    "hierarchical", "n_parents": P, "n_children": C}``; None: a flat dictionary."""
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    """Shown in the page's header: run dir, backbone, layer, tokens, architecture, split,
    and ``heatmaps``: what the heatmaps show (or why there are none)."""


@dataclass
class BrowserResult:
    path: Path
    n_latents: int
    seconds: dict[str, float]
    wandb_media: dict[str, Any]
    """``{"latents/top_images": png path, "latents/browser": {"columns", "rows"}}`` for
    ``hsae.tracking.log_standalone_run``."""


def copy_app(out_dir: Path) -> None:
    static = resources.files("hsae.browser") / "static"
    for name in APP_FILES:
        (out_dir / name).write_bytes((static / name).read_bytes())


def _num(values: np.ndarray, digits: int = 4) -> list:
    """Floats at ``digits`` significant digits (a third of the JSON), NaN as null."""
    out = []
    fmt = f"{{:.{digits}g}}"
    for v in np.asarray(values, dtype=np.float64).tolist():
        out.append(None if math.isnan(v) or math.isinf(v) else float(fmt.format(v)))
    return out


def _write_js(path: Path, payload: Any) -> None:
    path.write_text("hsaeData(" + json.dumps(payload, separators=(",", ":")) + ");\n")


def group_column(structure: dict[str, Any] | None, n_latents: int) -> np.ndarray:
    """Matryoshka: each latent's group; H-SAE: each child's parent (-1 for parents)."""
    group = np.full(n_latents, -1, np.int64)
    if structure is None:
        return group
    if structure["kind"] == "matryoshka":
        for g, (start, stop) in enumerate(structure["groups"]):
            group[start:stop] = g
    elif structure["kind"] == "hierarchical":
        n_parents, n_children = structure["n_parents"], structure["n_children"]
        group[n_parents:] = np.arange(n_latents - n_parents) // n_children
    else:
        raise HsaeError(f"unknown latent structure {structure['kind']!r}")
    return group


def index_payload(inputs: SiteInputs, shard_size: int, n_show: int, n_top: int,
                  grid_hw: tuple[int, int] | None, thumbs: str | None,
                  segments: SegmentHeat | None = None) -> dict:  # fmt: skip
    t, h = inputs.table, inputs.hierarchy
    n_latents = len(t.n_fired_k)
    names = sorted({name for name, _ in inputs.names.values()})
    name_index = {name: i for i, name in enumerate(names)}
    name_col = np.full(n_latents, -1, np.int64)
    score_col = np.full(n_latents, math.nan)
    for latent, (name, score) in inputs.names.items():
        name_col[latent], score_col[latent] = name_index[name], score
    rows = np.arange(n_latents)
    level = t.level_k
    at_level = np.where(level >= 0, t.purity_kl[rows, np.maximum(level, 0)], math.nan)
    adj_level = np.where(level >= 0, t.adjusted_kl[rows, np.maximum(level, 0)], math.nan)
    cols: dict[str, list] = {
        "density": _num(t.density_k),
        "mean_act": _num(t.mean_act_k),
        "max_act": _num(t.max_act_k),
        "n_fired": t.n_fired_k.tolist(),
        "level": level.tolist(),
        "purity": _num(at_level),
        "adjusted": _num(adj_level),
        "depth": _num(t.depth_k),
        "name": name_col.tolist(),
        "name_score": _num(score_col),
        "group": group_column(inputs.structure, n_latents).tolist(),
    }
    for lv, lname in enumerate(h.level_names):
        cols[f"purity@{lname}"] = _num(t.purity_kl[:, lv])
        cols[f"top@{lname}"] = t.top_class_kl[:, lv].tolist()
    if t.contain_parent_k is not None and t.contain_score_k is not None:
        cols["contain_parent"] = t.contain_parent_k.tolist()
        cols["containment"] = _num(t.contain_score_k)
    meta = {
        "format": FORMAT,
        "title": inputs.title,
        "info": inputs.info,
        "n_latents": n_latents,
        "n_images": t.n_images,
        "shard_size": shard_size,
        "n_show": n_show,
        "n_top": n_top,
        "levels": list(h.level_names),
        "classes": [list(c) for c in h.class_names],
        "parents": [list(p) for p in h.parents],
        "names": names,
        "grid": list(grid_hw) if grid_hw else None,
        "segments": {
            "grid": list(segments.grid_hw),
            "bytes": seg_dtype(segments.n_tokens).itemsize,
            "n_tokens": segments.n_tokens,
            "stage": segments.stage,
        }
        if segments is not None
        else None,
        "thumbs": thumbs,
        "structure": inputs.structure,
        "containment": {"images": t.contain_images, "of": t.n_images}
        if t.contain_parent_k is not None
        else None,
        "metrics": {  # NaN as null: strict JSON
            k: None if math.isnan(v) else v
            for k, v in inputs.metrics.items()
            if isinstance(v, int | float)
        },
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return {"meta": meta, "cols": cols}


def shard_payload(inputs: SiteInputs, start: int, stop: int, heat: np.ndarray | None) -> list:
    t = inputs.table
    finest = inputs.labels_nl[:, -1]
    out = []
    for k in range(start, stop):
        shown = t.show_row_ks[k] >= 0
        rows = t.show_row_ks[k][shown]
        item: dict[str, Any] = {
            "img": rows.tolist(),
            "act": _num(t.show_value_ks[k][shown], 3),
            "lab": finest[rows].tolist(),
            "nt": int(t.n_top_k[k]),
            "dist": [
                [
                    [int(c), int(n)]
                    for c, n in zip(t.dist_class_kld[k, lv], t.dist_count_kld[k, lv], strict=True)
                    if c >= 0
                ]
                for lv in range(t.dist_class_kld.shape[1])
            ],
        }
        if heat is not None:
            item["heat"] = [
                base64.b64encode(heat[k, s].tobytes()).decode() for s in range(len(rows))
            ]
        out.append(item)
    return out


def wandb_media(inputs: SiteInputs, out_dir: Path, thumbs: str | None, cells: CellMaps | None,
                n_grid: int = 8, n_rows: int = 200) -> dict[str, Any]:  # fmt: skip
    """The purest latents (one per class at their level) as a picture, and a table of the
    ``n_rows`` purest latents."""
    t, h = inputs.table, inputs.hierarchy
    scored = np.flatnonzero(t.level_k >= 0)
    purity = t.purity_kl[scored, t.level_k[scored]]
    order = scored[np.lexsort((-t.n_fired_k[scored], -purity))]
    columns = ["latent", "name", "name_score", "purest_level", "purity", "top_class", "density",
               "mean_act", "contained_in", "containment"]  # fmt: skip
    rows: list[list] = []
    grid: list[int] = []
    captions: list[str] = []
    seen: set[tuple[int, str]] = set()
    for k in order.tolist():
        lv = int(t.level_k[k])
        cls = h.class_names[lv][int(t.top_class_kl[k, lv])]
        name, score = inputs.names.get(k, ("", math.nan))
        parent = -1 if t.contain_parent_k is None else int(t.contain_parent_k[k])
        cont = math.nan if t.contain_score_k is None else float(t.contain_score_k[k])
        if len(rows) < n_rows:
            rows.append([k, name, score, h.level_names[lv], float(t.purity_kl[k, lv]), cls,
                         float(t.density_k[k]), float(t.mean_act_k[k]), parent, cont])  # fmt: skip
        if thumbs and len(grid) < n_grid and (lv, cls) not in seen:
            seen.add((lv, cls))
            grid.append(k)
            captions.append(f"#{k} {h.level_names[lv]}: {cls}\npurity {t.purity_kl[k, lv]:.2f}"
                            f"\ndensity {100 * t.density_k[k]:.2g}%")  # fmt: skip
    media: dict[str, Any] = {"latents/browser": {"columns": columns, "rows": rows}}
    if grid and thumbs:
        media["latents/top_images"] = wandb_grid(
            out_dir / WANDB_GRID, t, grid, captions, out_dir, thumbs, cells
        )
    return media


def _patch_cells(heat: np.ndarray, grid_hw: tuple[int, int]) -> CellMaps:
    return lambda latent, slot: heat[latent, slot].reshape(grid_hw)


def _segment_cells(table: LatentTable, heat: np.ndarray, segments: SegmentHeat) -> CellMaps:
    """Each shown image's segment map painted with the latent's heat (the W&B picture)."""

    def cells(latent: int, slot: int) -> np.ndarray | None:
        row = int(table.show_row_ks[latent, slot])
        if row < 0:
            return None
        return paint_segments(segments.maps(np.array([row]))[0], heat[latent, slot])

    return cells


def build_site(
    out_dir: str | Path,
    inputs: SiteInputs,
    *,
    load_image: ImageLoader | None = None,
    patch_maps: PatchMaps | None = None,
    grid_hw: tuple[int, int] | None = None,
    segments: SegmentHeat | None = None,
    n_top: int = 50,
    shard_size: int = 256,
    thumb_size: int = 96,
    thumb_format: str = "webp",
    heat_batch_bytes: int = 256 << 20,
) -> BrowserResult:
    """Write the browser for one set of latents into ``out_dir`` (replaced when it exists).
    ``load_image``: thumbnails (none without it); ``patch_maps`` with ``grid_hw``: heatmaps
    (patch tokens); ``segments``: heatmaps over segment tokens (CAST)."""
    if shard_size < 1:
        raise HsaeError(f"shard_size={shard_size} must be >= 1")
    if thumb_format not in ("webp", "png"):
        raise HsaeError(f"thumb_format={thumb_format!r}: use webp or png")
    if (patch_maps is None) != (grid_hw is None):
        raise HsaeError("pass patch_maps and grid_hw together (heatmaps need the patch grid)")
    if patch_maps is not None and segments is not None:
        raise HsaeError("pass patch_maps or segments, not both: a run has one kind of token")
    out_dir = Path(out_dir).resolve()
    t = inputs.table
    n_latents, n_show = t.show_row_ks.shape
    seconds: dict[str, float] = {}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    copy_app(tmp)

    thumbs = thumb_format if load_image is not None else None
    if load_image is not None:
        begin = time.perf_counter()
        rows = np.unique(t.show_row_ks[t.show_row_ks >= 0])
        n_written = write_thumbnails(tmp, rows, load_image, thumb_size, thumb_format)
        seconds["thumbnails"] = time.perf_counter() - begin
        log.info("browser: %d thumbnails (%d unreadable)", n_written, len(rows) - n_written)
    heat, cells = None, None
    if patch_maps is not None and grid_hw is not None:
        begin = time.perf_counter()
        n_patches = grid_hw[0] * grid_hw[1]
        batch = max(1, heat_batch_bytes // (n_patches * n_latents * 4))
        heat = heatmaps(t, patch_maps, n_patches, batch)
        cells = _patch_cells(heat, grid_hw)
        seconds["heatmaps"] = time.perf_counter() - begin
    if segments is not None:
        begin = time.perf_counter()
        write_segment_maps(tmp, np.unique(t.show_row_ks[t.show_row_ks >= 0]), segments)
        seconds["segment maps"] = time.perf_counter() - begin
        begin = time.perf_counter()
        batch = max(1, heat_batch_bytes // (segments.n_tokens * n_latents * 4))
        heat = heatmaps(t, segments.values, segments.n_tokens, batch)
        cells = _segment_cells(t, heat, segments)
        seconds["heatmaps"] = time.perf_counter() - begin

    begin = time.perf_counter()
    _write_js(tmp / "data" / "index.js",
              index_payload(inputs, shard_size, n_show, n_top, grid_hw, thumbs, segments))  # fmt: skip
    n_shards = 0
    for start in range(0, n_latents, shard_size):
        stop = min(start + shard_size, n_latents)
        _write_js(tmp / "data" / f"latents-{start // shard_size:05d}.js",
                  shard_payload(inputs, start, stop, heat))  # fmt: skip
        n_shards += 1
    seconds["data files"] = time.perf_counter() - begin
    begin = time.perf_counter()
    media = wandb_media(inputs, tmp, thumbs, cells)
    seconds["W&B picture"] = time.perf_counter() - begin
    manifest = {
        "format": FORMAT,
        "n_latents": n_latents,
        "n_images": t.n_images,
        "n_shards": n_shards,
        "shard_size": shard_size,
        "thumbs": thumbs,
        "heatmaps": heat is not None,
        "heat_kind": None if heat is None else "segments" if segments is not None else "patches",
        "title": inputs.title,
        "info": inputs.info,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    if "latents/top_images" in media:  # it moved with the folder
        media["latents/top_images"] = out_dir / WANDB_GRID
    log.info("browser: %d latents in %d shards at %s", n_latents, n_shards, out_dir / "index.html")
    return BrowserResult(out_dir, n_latents, seconds, media)
