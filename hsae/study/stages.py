"""The study's stages 0-3 for one backbone unit or SAE: stand-ins trained or found, step 1,
step 3 (with image half-samples); ``hsae.study.run`` orders them and writes the results."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from hsae.config import BackboneConfig, CacheConfig, DatasetConfig
from hsae.errors import HsaeError
from hsae.rundir import RunDir, sha256_file, write_json
from hsae.study import plan as plan_mod
from hsae.study.config import StudyConfig
from hsae.study.verdict import derived_metrics

log = logging.getLogger("hsae.study")


def write_json_record(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, default=json_default)


def json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only; NaN kept as None (JSON has no NaN)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v) if math.isfinite(float(v)) else None
    return out


def half_indices(n_images: int, n_halves: int, seed: int) -> list[np.ndarray]:
    """``n_halves`` half-samples of ``range(n_images)``, in complementary pairs (a seeded
    permutation split in two), the same for every backbone and SAE of a study."""
    rng = np.random.default_rng(seed)
    halves = []
    for _ in range(n_halves // 2):
        perm = rng.permutation(n_images)
        halves += [np.sort(perm[: n_images // 2]), np.sort(perm[n_images // 2 :])]
    return halves


class Timer:
    """Wall-clock and this process's CPU seconds per stage (on a shared machine the CPU time
    is the better guess at the wall time on an idle one)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[stage] = round(now - self._start, 2)
        self.cpu_seconds[stage] = round(cpu - self._cpu, 2)
        self._start, self._cpu = now, cpu


# ---- stage 0: stand-ins --------------------------------------------------------------


def train_one_stand_in(bb: dict[str, Any]) -> None:
    """One stand-in in a worker process: one thread, since the workers share the cores."""
    import torch

    from hsae.backbones.stand_in import ensure_stand_in

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    ensure_stand_in(bb["model_name"], bb["pretrained"], bb["init_seed"], bb.get("recipe"))


def train_missing_stand_ins(networks: dict[str, dict[str, Any]]) -> None:
    """Train the stand-ins not yet in the store side by side, one per core (joblib's
    process pool): each trains on one thread, so n cores train n at once, about n times
    sooner than one after another. The store's file lock keeps concurrent studies safe."""
    from joblib import Parallel, delayed

    from hsae.backbones.stand_in.store import Recipe, store_path

    missing = [
        bb
        for bb in networks.values()
        if not store_path(
            bb["model_name"], bb["pretrained"], bb["init_seed"], Recipe.from_dict(bb.get("recipe"))
        ).exists()
    ]
    n_jobs = min(len(missing), os.cpu_count() or 1)
    if n_jobs < 2:
        return  # none missing, or one core: ensure_stand_in trains in this process
    log.info("study [stand-ins] training %d missing stand-ins, %d at a time", len(missing), n_jobs)
    Parallel(n_jobs=n_jobs)(delayed(train_one_stand_in)(bb) for bb in missing)


def ensure_stand_ins(units: list[plan_mod.Unit]) -> dict[str, dict[str, Any]]:
    """Train (or find) every stand-in the study uses; returns each network's store folder
    and held-out metrics (accuracy per level, CPCC)."""
    networks = {u.network: u.backbone for u in units if u.backbone.get("loader") == "stand_in"}
    if not networks:
        return {}
    from hsae.backbones.stand_in import ensure_stand_in

    train_missing_stand_ins(networks)
    out = {}
    for i, (network, bb) in enumerate(sorted(networks.items()), 1):
        start = time.perf_counter()
        path = ensure_stand_in(
            bb["model_name"], bb["pretrained"], bb["init_seed"], bb.get("recipe")
        )
        metrics = json.loads((path / "metrics.json").read_text())
        log.info(
            "study [stand-ins %d/%d] %s: %s (%.1f s)",
            i,
            len(networks),
            network,
            path.name,
            time.perf_counter() - start,
        )
        out[network] = {"store": str(path), "metrics": clean_metrics(metrics)}
    return out


# ---- stage 1: step 1 -----------------------------------------------------------------


def _fingerprint(cache_dir: str | None) -> str | None:
    if not cache_dir:
        return None
    manifest = Path(cache_dir) / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["spec"].get("backbone", {}).get("fingerprint")


def step1(
    unit: plan_mod.Unit,
    dataset: dict,
    cache_cfg: CacheConfig,
    study: StudyConfig,
    out_dir: Path,
    device: str,
) -> dict[str, Any]:
    from hsae.cache import ActivationCache, resolve_device
    from hsae.evaluation import hierarchy_of_backbone
    from hsae.evaluation.step1 import PART_WHOLE_IMAGES
    from hsae.metrics.hierarchy import hierarchy_metrics
    from hsae.metrics.part_whole import PART_WHOLE_KEYS

    path = out_dir / "step1" / f"{unit.name}.json"
    key = {
        "backbone": unit.backbone,
        "dataset": dataset,
        "n_image_halves": study.n_image_halves,
        "joint_dataset": study.joint_dataset,
        "joint": study.joint_dataset_overrides,
        # Records from before step 1 had part-whole metrics lack this, so they are redone.
        "part_whole_images": PART_WHOLE_IMAGES,
    }
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("key") == json.loads(json.dumps(key)):
            return record
        log.info("study: %s was computed with another config; recomputing", path)
    backbone_cfg = BackboneConfig(**unit.backbone)
    metrics, raw_path = hierarchy_of_backbone(
        backbone_cfg, DatasetConfig(**dataset), cache_cfg, "val", out_dir / "step1" / "raw", device
    )
    raw = json.loads(raw_path.read_text())
    cache_dir = raw["cache"]
    cache = ActivationCache.open(cache_dir)
    per_image = cache.manifest["tokens_per_image"]
    feats = cache.load_all().view(-1, per_image, cache.d_model).mean(dim=1)
    feats = feats.to(resolve_device(device))
    labels = cache.labels_nl[cache.row_image(np.arange(0, cache.n_rows, per_image))]
    halves = []
    for idx in half_indices(len(feats), study.n_image_halves, study.boot_seed):
        half = hierarchy_metrics(feats[idx], labels[idx], cache.hierarchy)
        halves.append(clean_metrics(half | derived_metrics(half)))
    # Part-whole (segment trees: CAST, the CAST stand-in): per-image values, so each half is
    # the mean over its own half-sample of the images step 1 scored.
    per_image = raw.get("part_whole_per_image")
    if per_image:
        n_scored = len(next(iter(per_image.values())))
        for half, idx in zip(
            halves, half_indices(n_scored, study.n_image_halves, study.boot_seed), strict=True
        ):
            half |= clean_metrics(
                {k: float(np.mean(np.asarray(v)[idx])) for k, v in per_image.items()}
            )
    joint = None
    if study.joint_dataset is not None:
        joint_ds = plan_mod.group_node("dataset", study.joint_dataset) | dict(
            study.joint_dataset_overrides
        )
        try:
            joint_metrics, _ = hierarchy_of_backbone(
                backbone_cfg,
                DatasetConfig(**joint_ds),
                cache_cfg,
                "val",
                out_dir / "step1" / "raw",
                device,
            )
            joint = {"metrics": clean_metrics(joint_metrics)}
        except HsaeError as e:  # e.g. no text tower, or the data is not on this machine
            joint = {"skipped": str(e)}
            log.warning("study: joint image-text metrics skipped for %s: %s", unit.name, e)
    record = {
        "key": key,
        "unit": unit.name,
        "metrics": clean_metrics(metrics | derived_metrics(metrics)),
        "halves": halves,
        # Why part-whole keys are empty (no segment tree, no masks): the report says so.
        "skipped": {k: v for k, v in raw.get("skipped", {}).items() if k in PART_WHOLE_KEYS},
        "cache": cache_dir,
        "fingerprint": _fingerprint(cache_dir),
        "joint": joint,
    }
    write_json_record(path, record)
    return record


# ---- stage 3: step 3 -----------------------------------------------------------------


class BackboneCache:
    """The backbone of the unit being evaluated, built once for all of its SAEs (control and
    names run it; building it can cost as much as using it)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.backbone: Any = None

    def get(self, cfg: dict, device: Any) -> Any:
        from hsae.evaluation import make_run_backbone

        key = json.dumps(cfg["backbone"], sort_keys=True)
        if key != self.key:
            self.key, self.backbone = key, make_run_backbone(cfg, device)
        return self.backbone


def _step3_metrics(
    run_dir: Path, study: StudyConfig, device: str, backbones: BackboneCache
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Interpretability on each image half (the SAE's value: their mean), control on the
    full split, names when the backbone has a text tower; all through hsae.evaluation."""
    import torch

    from hsae.cache import ActivationCache, resolve_device
    from hsae.evaluation import (
        automatic_names,
        control_metrics,
        evaluate_run,
        image_pass,
        interpretability,
        read_run_cfg,
    )
    from hsae.sae import load_sae

    cfg = read_run_cfg(run_dir)
    dev = resolve_device(device)
    sae = load_sae(run_dir).to(dev).eval()
    cache = ActivationCache.open(cfg["cache"]["val"])
    images = image_pass(sae, cache, study.eval_batch_size, dev)
    one_row = cache.manifest["tokens_per_image"] == 1
    seed = cfg.get("seed", 0)
    # The MS reference evaluate.py uses by default, the same for every backbone compared.
    reference = inspect.signature(evaluate_run).parameters["reference"].default
    halves = []
    for idx in half_indices(len(images.image_ids), study.n_image_halves, study.boot_seed):
        sub = replace(
            images,
            acts_ik=images.acts_ik[idx],
            feats_id=images.feats_id[idx],
            recon_id=images.recon_id[idx],
            image_ids=images.image_ids[idx],
        )
        metrics, _ = interpretability(sae, cache, sub, cfg, "val", reference, study.n_top, seed)
        if one_row:  # rows are images: the SAE's own metrics on the half, exactly
            x, x_hat = sub.feats_id.float(), sub.recon_id.float()
            with torch.no_grad():
                metrics["fvu"] = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        halves.append(clean_metrics(metrics | derived_metrics(metrics)))
    full: dict[str, float] = {}
    for key in sorted({k for h in halves for k in h}):
        values = [h.get(key) for h in halves]
        if all(v is not None for v in values):
            full[key] = float(np.mean(values))
    full.pop("fvu", None)  # the full split's own fvu (evaluate_run) is the estimate
    no_backbone = cfg["dataset"]["name"] == "activations"
    if not no_backbone and (study.control or study.names):
        backbone = backbones.get(cfg, dev)
        if study.control:
            full |= control_metrics(
                sae, cache, images, cfg, "val", seed=seed, device=dev, backbone=backbone
            )
        if study.names and hasattr(backbone, "encode_text"):
            names, _ = automatic_names(
                sae, cache, images, cfg, "val", backbone, None, study.n_top, seed
            )
            full |= names
    return clean_metrics(full | derived_metrics(full)), halves


def step3(
    run_dir: Path, study: StudyConfig, device: str, backbones: BackboneCache
) -> dict[str, Any]:
    """``eval.json`` (evaluate_run: the SAE's own metrics on the full held-out split) and
    ``study_eval.json`` (+ interpretability per image half, control, names)."""
    from hsae.evaluation import evaluate_run

    path = run_dir / "study_eval.json"
    settings = {
        "control": study.control,
        "names": study.names,
        "n_top": study.n_top,
        "n_image_halves": study.n_image_halves,
        "boot_seed": study.boot_seed,
    }
    sha = sha256_file(RunDir(run_dir).weights)
    if path.exists() and RunDir(run_dir).eval.exists():
        record = json.loads(path.read_text())
        if record.get("settings") == settings and record.get("sae_sha256") == sha:
            return record
    kwargs: dict[str, Any] = dict(
        split="val",
        batch_size=study.eval_batch_size,
        device=device,
        interp=False,
        control=False,
        names=False,
    )
    own = evaluate_run(run_dir, **kwargs)
    rest, halves = _step3_metrics(run_dir, study, device, backbones)
    record = {
        "settings": settings,
        "sae_sha256": sha,
        "metrics": clean_metrics(own) | rest,
        "halves": halves,
    }
    write_json_record(path, record)
    return record
