"""The browser of one run dir: its SAE, its cache's split, its ``eval.json``, its images."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsae import rundir
from hsae.browser.site import BrowserResult, SiteInputs, build_site
from hsae.browser.stats import containment, latent_table
from hsae.cache import ActivationCache, resolve_device
from hsae.errors import HsaeError
from hsae.evaluation.inputs import patch_grid

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


def _patch_maps(sae: torch.nn.Module, cache: ActivationCache, device: torch.device):
    tokens_per_image = cache.manifest["tokens_per_image"]
    offsets = np.arange(tokens_per_image)

    @torch.no_grad()
    def maps(image_rows: np.ndarray, pair_image: np.ndarray, pair_latent: np.ndarray):
        rows = (np.asarray(image_rows)[:, None] * tokens_per_image + offsets).ravel()
        codes = sae(cache.read(rows).to(device)).codes.float()
        codes = codes.view(len(image_rows), tokens_per_image, -1)
        return codes[torch.as_tensor(pair_image), :, torch.as_tensor(pair_latent)].cpu()

    return maps


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
    grid = patch_grid(cache)
    result = build_site(
        Path(out_dir) if out_dir is not None else run_dir / BROWSER_DIR,
        inputs,
        load_image=_image_loader(cfg, cache, split, image_ids),
        patch_maps=_patch_maps(sae, cache, dev) if grid else None,
        grid_hw=grid,
        n_top=n_top,
        shard_size=shard_size,
        thumb_size=thumb_size,
    )
    result.seconds = seconds | result.seconds
    return result
