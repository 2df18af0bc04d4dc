"""The browser of one run dir: its SAE, its cache's split, its ``eval.json``, its images."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae import rundir
from hsae.browser.media import PatchMaps, SegmentHeat
from hsae.browser.site import BrowserResult, SiteInputs, build_site
from hsae.browser.stats import containment, latent_table
from hsae.cache import ActivationCache, resolve_device
from hsae.errors import HsaeError
from hsae.evaluation.inputs import patch_grid, ragged_images

log = logging.getLogger(__name__)

BROWSER_DIR = rundir.BROWSER


def latent_structure(sae: torch.nn.Module) -> dict[str, Any] | None:
    """Matryoshka groups (the increments between prefix ends) or H-SAE parents/children."""
    ends = list(getattr(sae, "ends", None) or [])
    if ends:
        return {
            "kind": "matryoshka",
            "groups": [list(g) for g in zip([0, *ends[:-1]], ends, strict=True)],
        }
    if getattr(sae, "arch", None) == "hierarchical":
        n_parents, n_children = getattr(sae, "n_parents"), getattr(sae, "n_children")  # noqa: B009
        return {"kind": "hierarchical", "n_parents": int(n_parents), "n_children": int(n_children)}
    return None


def names_from_record(record: dict) -> dict[int, tuple[str, float]]:
    """Automatic names from ``eval.json``'s per-latent table (backbones with a text tower)."""
    table = record.get("latents")
    if not table:
        return {}
    columns = table["columns"]
    i_latent, i_name, i_score = (columns.index(c) for c in ("latent", "name", "name_score"))
    return {int(r[i_latent]): (str(r[i_name]), float(r[i_score])) for r in table["rows"]}


def _image_loader(cfg: dict, cache: ActivationCache, split: str, image_ids: np.ndarray):
    """Row -> the image as the backbone saw it (its resize and centre crop, so the patch
    grid lies over the right pixels), or None when the run has no images."""
    from types import SimpleNamespace

    from hsae.backbones.base import Backbone, Preprocess
    from hsae.browser.media import as_uint8_image
    from hsae.data import ImageError
    from hsae.evaluation import run_dataset

    spec = cache.manifest["spec"].get("preprocess")
    if cfg["dataset"]["name"] == "activations" or spec is None:
        return None
    pre = Preprocess(
        size=tuple(spec["size"]), resize=tuple(spec["resize"]), resize_mode=spec["resize_mode"],
        interpolation=spec["interpolation"], mean=tuple(spec["mean"]), std=tuple(spec["std"]),
    )  # fmt: skip
    geometry = SimpleNamespace(pre=pre)  # Backbone.resize_crop reads only .pre
    dataset = run_dataset(cfg, split, None)

    def load(row: int) -> np.ndarray | None:
        image = dataset[int(image_ids[row])][0]
        if isinstance(image, ImageError):
            return None
        return as_uint8_image(Backbone.resize_crop(geometry, image))  # type: ignore[arg-type]

    return load


def _patch_maps(
    sae: torch.nn.Module, cache: ActivationCache, device: torch.device, offsets: np.ndarray
) -> PatchMaps:
    """Heatmap values from the SAE run on each image's patch rows (``offsets``: the patch
    rows' places among the image's ``tokens_per_image`` rows)."""
    tokens_per_image = cache.manifest["tokens_per_image"]

    @torch.no_grad()
    def maps(image_rows: np.ndarray, pair_image: np.ndarray, pair_latent: np.ndarray):
        rows = (np.asarray(image_rows)[:, None] * tokens_per_image + offsets).ravel()
        codes = sae(cache.read(rows).to(device)).codes.float()
        codes = codes.view(len(image_rows), len(offsets), -1)
        return codes[torch.as_tensor(pair_image), :, torch.as_tensor(pair_latent)].cpu()

    return maps


def all_tokens_grid(cache: ActivationCache) -> tuple[tuple[int, int], int] | None:
    """``tokens=all``: ``(patch grid, number of prefix tokens)`` when an image's rows are
    prefix tokens (CLS, registers: fewer than a grid side) followed by a square patch grid."""
    token_index = cache.manifest["token_index"]
    if cache.manifest["spec"].get("tokens") != "all" or token_index != list(
        range(len(token_index))
    ):
        return None
    side = math.isqrt(len(token_index))
    n_prefix = len(token_index) - side * side
    return ((side, side), n_prefix) if side > 1 and n_prefix < side else None


def hooked_stage(cache: ActivationCache) -> int:
    """The CAST stage of the cached layer (0: superpixel tokens), from its module name."""
    name = cache.manifest.get("layer", {}).get("name", "")
    found = re.search(r"(?:^|\.)stages\.(\d+)\.", name)
    if found is None:
        raise HsaeError(
            f"cache {cache.path}: layer {name!r} is not a CAST stage's block (stages.<k>.*); "
            "segment heatmaps need a cache built with backbone.tokens=segments on CAST"
        )
    return int(found[1])


def segment_heat(
    sae: torch.nn.Module, cache: ActivationCache, image_ids: np.ndarray, device: torch.device
) -> SegmentHeat:
    """Heatmaps over segment tokens (``tokens=segments``): each shown image's map is its
    segment tree's partition at the hooked stage (superpixels at stage 0, the argmax
    clusters of each pooling after), on the stem grid the model averaged its tokens over;
    a row's token id indexes that map. Only the images asked for are looked up."""
    stage = hooked_stage(cache)
    trees = cache.segment_trees()
    if stage > len(trees.parents):
        raise HsaeError(f"cache {cache.path}: stage {stage} but trees of {len(trees.parents)}")
    starts, ends = ragged_images(cache)
    assert cache.row_index is not None  # a ragged cache
    n_tokens = int(np.asarray(cache.row_index[:, 1]).max()) + 1
    order = np.argsort(trees.image_ids, kind="stable")
    tree_ids = trees.image_ids[order]

    def maps(image_rows: np.ndarray) -> np.ndarray:
        ids = np.asarray(image_ids)[np.asarray(image_rows)]
        at = np.minimum(np.searchsorted(tree_ids, ids), len(tree_ids) - 1)
        if not (tree_ids[at] == ids).all():
            raise HsaeError(f"cache {cache.path} has no segment tree for images {ids.tolist()}")
        tree = order[at]
        level = trees.segments[tree].astype(np.int64).reshape(len(tree), -1)
        for k in range(stage):  # stage-k token -> the stage-k+1 token it is assigned to
            parents = trees.parents[k][tree].astype(np.int64)
            inside = (level >= 0) & (level < parents.shape[1])
            level = np.where(inside, np.take_along_axis(parents, np.where(inside, level, 0), 1), -1)
        return level.reshape(trees.segments[tree].shape)

    @torch.no_grad()
    def values(image_rows: np.ndarray, pair_image: np.ndarray, pair_latent: np.ndarray):
        first, last = starts[np.asarray(image_rows)], ends[np.asarray(image_rows)]
        counts = last - first
        image_r = np.repeat(np.arange(len(first)), counts)
        rows = np.concatenate([np.arange(a, b) for a, b in zip(first, last, strict=True)])
        codes = sae(cache.read(rows).to(device)).codes.float()
        token_r = torch.as_tensor(np.asarray(cache.row_token(rows)), device=device)
        dense = torch.zeros(len(first), n_tokens, codes.shape[1], device=device)
        dense[torch.as_tensor(image_r, device=device), token_r] = codes
        return dense[torch.as_tensor(pair_image), :, torch.as_tensor(pair_latent)].cpu()

    grid = tuple(int(n) for n in trees.segments.shape[1:])
    return SegmentHeat(values, maps, (grid[0], grid[1]), n_tokens, stage)


def heat_sources(
    sae: torch.nn.Module, cache: ActivationCache, image_ids: np.ndarray, device: torch.device
) -> tuple[dict[str, Any], str]:
    """``build_site``'s heatmap arguments for the cache's tokens, and what the page says
    about them."""
    tokens = cache.manifest["spec"].get("tokens")
    if tokens == "segments":  # ragged rows: no token_index, no grid
        seg = segment_heat(sae, cache, image_ids, device)
        what = "superpixel" if seg.stage == 0 else f"stage-{seg.stage + 1} segment"
        note = (
            f"the latent on each {what} token, painted over its segment (the cached segment "
            f"tree on the model's {seg.grid_hw[0]} x {seg.grid_hw[1]} stem grid)"
        )
        return {"segments": seg}, note
    grid = patch_grid(cache)
    if grid is not None:
        offsets = np.arange(cache.manifest["tokens_per_image"])
        maps = _patch_maps(sae, cache, device, offsets)
        return {"patch_maps": maps, "grid_hw": grid}, "the latent on each patch"
    found = all_tokens_grid(cache)
    if found is not None:
        grid, n_prefix = found
        offsets = np.arange(n_prefix, n_prefix + grid[0] * grid[1])
        note = "the latent on each patch"
        if n_prefix:
            note += (
                f"; the {n_prefix} token(s) before the patches (class token, registers) are "
                "not drawn, so an image ranked by its class token can show a faint map"
            )
        return {"patch_maps": _patch_maps(sae, cache, device, offsets), "grid_hw": grid}, note
    if tokens == "all":
        return {}, "none: these tokens=all rows are not a class token and a square patch grid"
    if tokens is None:
        return {}, "none: rows from an activations file (no place in an image)"
    return {}, f"none: tokens={tokens} is one row per image (no place in the image to paint)"


def write_run_browser(
    run_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    sae: torch.nn.Module | None = None,
    cache: ActivationCache | None = None,
    acts_ik: torch.Tensor | None = None,
    image_ids: np.ndarray | None = None,
    split: str | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 4096,
    n_top: int = 50,
    n_show: int = 12,
    shard_size: int = 256,
    thumb_size: int = 96,
    title: str | None = None,
) -> BrowserResult:
    """Write the feature browser of a finished run into ``<run dir>/browser/`` (or
    ``out_dir``). ``evaluate.py`` passes the SAE, cache and per-image activations of its own
    pass (``acts_ik``, ``image_ids``); without them the SAE is run over the split's cache
    here. Names and metrics come from ``eval.json`` when it exists."""
    from hsae.evaluation import image_pass, read_run_cfg
    from hsae.sae import load_sae

    run_dir = Path(run_dir).resolve()
    cfg = read_run_cfg(run_dir)
    eval_path = rundir.RunDir(run_dir).eval
    record = json.loads(eval_path.read_text()) if eval_path.exists() else {}
    split = split or record.get("split") or "val"
    if split not in cfg["cache"]:
        raise HsaeError(f"split={split!r} has no cache in this run; valid: {sorted(cfg['cache'])}")
    dev = resolve_device(device) if isinstance(device, str) else device
    if sae is None:
        sae = load_sae(run_dir).to(dev).eval()
    if cache is None:
        cache = ActivationCache.open(cfg["cache"][split])
    seconds: dict[str, float] = {}
    if acts_ik is None or image_ids is None:
        begin = time.perf_counter()
        images = image_pass(sae, cache, batch_size, dev)
        acts_ik, image_ids = images.acts_ik, images.image_ids
        seconds["encoding pass"] = time.perf_counter() - begin
    labels = cache.labels_nl[image_ids]
    begin = time.perf_counter()
    table = latent_table(acts_ik, labels, cache.hierarchy, n_top=n_top, n_show=n_show)
    seconds["latent statistics"] = time.perf_counter() - begin
    begin = time.perf_counter()
    containment(acts_ik, table)
    seconds["containment"] = time.perf_counter() - begin
    backbone = cfg.get("backbone", {})
    info = {
        "run_dir": str(run_dir),
        "backbone": backbone.get("name"),
        "layer": backbone.get("layer"),
        "tokens": cache.manifest["spec"].get("tokens"),
        "arch": getattr(sae, "arch", type(sae).__name__),
        "split": split,
        "dataset": cfg.get("dataset", {}).get("name"),
    }
    heat_args, info["heatmaps"] = heat_sources(sae, cache, image_ids, dev)
    tracking = cfg.get("tracking", {})
    inputs = SiteInputs(
        title=title or tracking.get("name") or run_dir.name,
        hierarchy=cache.hierarchy,
        table=table,
        labels_nl=labels,
        names=names_from_record(record),
        structure=latent_structure(sae),
        metrics=record.get("metrics", {}),
        info=info,
    )
    result = build_site(
        Path(out_dir) if out_dir is not None else run_dir / BROWSER_DIR,
        inputs,
        load_image=_image_loader(cfg, cache, split, image_ids),
        **heat_args,
        n_top=n_top,
        shard_size=shard_size,
        thumb_size=thumb_size,
    )
    result.seconds = seconds | result.seconds
    return result


def evaluate_with_browser(run_dir: str | Path, **step3_kwargs: Any) -> dict[str, float]:
    """What ``evaluate.py run_dir=...`` does: step 3 (``run_step3``: ``eval.json``), then
    the run's feature browser from that pass's per-image activations (no second pass over
    the cache), then the eval W&B run with step 3's media and the browser's. Returns the
    metrics."""
    from hsae.evaluation.step3 import log_step3, run_step3

    result = run_step3(run_dir, **step3_kwargs)
    pages = write_run_browser(
        result.run_dir, sae=result.sae, cache=result.cache, acts_ik=result.images.acts_ik,
        image_ids=result.images.image_ids, split=result.split, device=result.device,
        n_top=result.n_top,
    )  # fmt: skip
    log_step3(result, pages.wandb_media)
    return result.metrics
