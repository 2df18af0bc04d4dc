"""The study, end to end: ``python train.py study=default`` (docs/study.md).

Stages, each reusing what a previous run finished (and never a stale artifact):

0. stand-ins: trained or found in their content-addressed store (``ensure_stand_in``);
1. step 1 per unit: ``hierarchy_of_backbone`` on the held-out split, plus the same metrics
   on half-samples of its images -> ``step1/<unit>.json`` (reused when the backbone, dataset
   and halves are the same);
2. SAEs: one bank job per unit x SAE seed (``hsae.training.run.train``) -> ``sae/<unit>/
   seed<s>-<config hash>/bank/<member>/`` (a finished job is skipped by ``train`` itself);
3. step 3 per SAE: ``evaluate_run`` (-> ``eval.json``), plus interpretability on the image
   half-samples -> ``study_eval.json`` (reused when the SAE file's hash and the settings match);
4. comparison at matched L0, verdict -> ``results.json``; report -> ``report.md`` + PNGs and
   a W&B run of job type ``compare``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from hsae.config import BackboneConfig, CacheConfig, DatasetConfig, RunConfig, to_objects
from hsae.errors import HsaeError
from hsae.rundir import BANK_DIR, RunDir, sha256_file, write_json
from hsae.study import plan as plan_mod
from hsae.study.compare import compare_study, metric_value
from hsae.study.config import StudyConfig
from hsae.study.verdict import derived_metrics, make_verdict

log = logging.getLogger("hsae.study")
RESULTS = "results.json"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(metrics: dict[str, Any]) -> dict[str, float]:
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


def _train_one(bb: dict[str, Any]) -> None:
    """One stand-in in a worker process: one thread, since the workers share the cores."""
    import torch

    from hsae.backbones.stand_in import ensure_stand_in

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    ensure_stand_in(bb["model_name"], bb["pretrained"], bb["init_seed"], bb.get("recipe"))


def _train_missing(networks: dict[str, dict[str, Any]]) -> None:
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
    Parallel(n_jobs=n_jobs)(delayed(_train_one)(bb) for bb in missing)


def ensure_stand_ins(units: list[plan_mod.Unit]) -> dict[str, dict[str, Any]]:
    """Train (or find) every stand-in the study uses; returns each network's store folder
    and held-out metrics (accuracy per level, CPCC)."""
    networks = {u.network: u.backbone for u in units if u.backbone.get("loader") == "stand_in"}
    if not networks:
        return {}
    from hsae.backbones.stand_in import ensure_stand_in

    _train_missing(networks)
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
        out[network] = {"store": str(path), "metrics": _clean(metrics)}
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
    from hsae.metrics.hierarchy import hierarchy_metrics

    path = out_dir / "step1" / f"{unit.name}.json"
    key = {
        "backbone": unit.backbone,
        "dataset": dataset,
        "n_image_halves": study.n_image_halves,
        "joint_dataset": study.joint_dataset,
        "joint": study.joint_dataset_overrides,
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
    cache_dir = json.loads(raw_path.read_text())["cache"]
    cache = ActivationCache.open(cache_dir)
    per_image = cache.manifest["tokens_per_image"]
    feats = cache.load_all().view(-1, per_image, cache.d_model).mean(dim=1)
    feats = feats.to(resolve_device(device))
    labels = cache.labels_nl[cache.row_image(np.arange(0, cache.n_rows, per_image))]
    halves = []
    for idx in half_indices(len(feats), study.n_image_halves, study.boot_seed):
        half = hierarchy_metrics(feats[idx], labels[idx], cache.hierarchy)
        halves.append(_clean(half | derived_metrics(half)))
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
            joint = {"metrics": _clean(joint_metrics)}
        except HsaeError as e:  # e.g. no text tower, or the data is not on this machine
            joint = {"skipped": str(e)}
            log.warning("study: joint image-text metrics skipped for %s: %s", unit.name, e)
    record = {
        "key": key,
        "unit": unit.name,
        "metrics": _clean(metrics | derived_metrics(metrics)),
        "halves": halves,
        "cache": cache_dir,
        "fingerprint": _fingerprint(cache_dir),
        "joint": joint,
    }
    _write_json(path, record)
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
        halves.append(_clean(metrics | derived_metrics(metrics)))
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
    return _clean(full | derived_metrics(full)), halves


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
    if "browser" in inspect.signature(evaluate_run).parameters:
        kwargs["browser"] = False  # one page per SAE would cost more than the study's budget
    own = evaluate_run(run_dir, **kwargs)
    rest, halves = _step3_metrics(run_dir, study, device, backbones)
    record = {
        "settings": settings,
        "sae_sha256": sha,
        "metrics": _clean(own) | rest,
        "halves": halves,
    }
    _write_json(path, record)
    return record


# ---- the study ------------------------------------------------------------------------


def _sae_record(
    out_dir: Path,
    unit: plan_mod.Unit,
    job: plan_mod.Job,
    member_dir: Path,
    entry: dict,
    evaluated: dict[str, Any],
    trained: dict[str, Any],
) -> dict[str, Any]:
    metrics = dict(evaluated["metrics"])
    return {
        "unit": unit.name,
        "network": unit.network,
        "kind": unit.kind,
        "role": unit.role,
        "layer_pos": unit.layer_pos,
        "layer": unit.backbone["layer"],
        "sae_seed": job.sae_seed,
        "expansion": int(entry["expansion"]),
        "k": int(entry["k"]),
        "run_dir": str(member_dir.relative_to(out_dir)),
        "train_metrics": _clean(trained),
        "metrics": metrics,
        "halves": evaluated["halves"],
    }


def write_study_browser(results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """One feature-browser page per kind and the side-by-side page, in ``out_dir/browser``.
    Each kind shows one SAE, the same SAE config for every kind (so the pages compare at
    matched L0): its first backbone seed's first layer, the first SAE seed, the widest
    expansion and the middle k of the grid."""
    from hsae.browser import write_comparison_browser

    study = results["study"]
    expansion = max(study["expansions"])
    ks = sorted(study["ks"])
    k = ks[(len(ks) - 1) // 2]
    chosen: dict[str, dict[str, Any]] = {}
    for rec in results["saes"]:
        kind = rec["kind"]
        if rec["expansion"] != expansion or rec["k"] != k or rec["layer_pos"] != 0:
            continue
        key = (rec["network"], rec["sae_seed"])
        if kind not in chosen or key < (chosen[kind]["network"], chosen[kind]["sae_seed"]):
            chosen[kind] = rec
    labels = [kind["label"] for kind in study["kinds"]]
    missing = [label for label in labels if label not in chosen]
    if missing:
        raise HsaeError(
            f"study browser: no SAE with expansion {expansion}, k {k} for kind(s) {missing}; "
            "set study.browser=false or check the grid"
        )
    index = write_comparison_browser(
        {label: out_dir / chosen[label]["run_dir"] for label in labels}, out_dir / "browser"
    )
    log.info("study [browser] %s", index)
    return {
        "index": str(index.relative_to(out_dir)),
        "expansion": expansion,
        "k": k,
        "saes": {label: chosen[label]["run_dir"] for label in labels},
    }


def run_study(cfg_dict: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run (or finish) the study configured in ``cfg_dict.study``; returns ``results.json``."""
    out_dir = Path(out_dir).resolve()
    cfg: RunConfig = to_objects(cfg_dict, RunConfig)
    study = cfg.study
    if study is None:
        raise HsaeError("run_study needs a study config: python train.py study=default")
    timer = Timer()
    units = plan_mod.make_units(study)
    jobs = plan_mod.make_jobs(cfg_dict, study, units, out_dir)
    dataset = plan_mod.dataset_node(cfg_dict, study)
    n_saes = len(jobs) * len(study.expansions) * len(study.ks)
    log.info(
        "study %s: %d backbone units (%s), %d SAE bank jobs, %d SAEs -> %s",
        study.name,
        len(units),
        ", ".join(u.name for u in units),
        len(jobs),
        n_saes,
        out_dir,
    )
    _write_json(
        out_dir / "plan.json",
        {
            "study": asdict(study),
            "units": [asdict(u) for u in units],
            "jobs": [
                {"unit": j.unit.name, "sae_seed": j.sae_seed, "run_dir": str(j.run_dir)}
                for j in jobs
            ],
        },
    )

    stand_ins = ensure_stand_ins(units)
    timer.lap("stand_ins")
    if study.threads is not None:
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(study.threads)
    try:
        return _steps(cfg_dict, cfg, study, units, jobs, dataset, stand_ins, timer, out_dir, n_saes)
    finally:
        if study.threads is not None:
            torch.set_num_threads(threads_before)


def _steps(
    cfg_dict: DictConfig,
    cfg: RunConfig,
    study: StudyConfig,
    units: list[plan_mod.Unit],
    jobs: list[plan_mod.Job],
    dataset: dict,
    stand_ins: dict,
    timer: Timer,
    out_dir: Path,
    n_saes: int,
) -> dict[str, Any]:
    """Steps 1 to 3, the comparison and the report (after the stand-ins)."""
    from hsae.training.run import train

    device = cfg.cache.device
    step1_records = {}
    for i, unit in enumerate(units, 1):
        start = time.perf_counter()
        step1_records[unit.name] = step1(unit, dataset, cfg.cache, study, out_dir, device)
        log.info(
            "study [step 1 %d/%d] %s: %s = %.4g (%.1f s)",
            i,
            len(units),
            unit.name,
            study.step1_metric,
            metric_value(step1_records[unit.name]["metrics"], study.step1_metric),
            time.perf_counter() - start,
        )
    timer.lap("step1")

    trained: dict[str, list[dict[str, Any]]] = {}
    n_trained = 0
    for i, job in enumerate(jobs, 1):
        start = time.perf_counter()
        done_before = RunDir(job.run_dir).bank.exists() and all(
            RunDir(d).metrics.exists() for d in (job.run_dir / BANK_DIR).glob("*")
        )
        result = train(
            job.cfg,
            job.run_dir,
            name=f"{study.name}/{job.unit.name}/seed{job.sae_seed}",
            group=study.name,
        )
        trained[str(job.run_dir)] = result if isinstance(result, list) else [result]
        n_trained += 0 if done_before else 1
        log.info(
            "study [SAEs %d/%d] %s seed %d: %d SAEs %s (%.1f s)",
            i,
            len(jobs),
            job.unit.name,
            job.sae_seed,
            len(trained[str(job.run_dir)]),
            "reused" if done_before else "trained",
            time.perf_counter() - start,
        )
    timer.lap("train")

    sae_records = []
    entries = plan_mod.grid(study)
    backbones = BackboneCache()
    n_eval = 0
    for i, job in enumerate(jobs, 1):
        from hsae.training.bank import entry_dir_name

        start = time.perf_counter()
        for index, entry in enumerate(entries):
            member_dir = job.run_dir / "bank" / entry_dir_name(index, entry)
            before = (
                (member_dir / "study_eval.json").stat().st_mtime
                if (member_dir / "study_eval.json").exists()
                else None
            )
            evaluated = step3(member_dir, study, device, backbones)
            after = (member_dir / "study_eval.json").stat().st_mtime
            n_eval += before != after
            sae_records.append(
                _sae_record(
                    out_dir,
                    job.unit,
                    job,
                    member_dir,
                    entry,
                    evaluated,
                    trained[str(job.run_dir)][index],
                )
            )
        log.info(
            "study [step 3 %d/%d] %s seed %d: %d SAEs evaluated (%.1f s)",
            i,
            len(jobs),
            job.unit.name,
            job.sae_seed,
            len(entries),
            time.perf_counter() - start,
        )
    timer.lap("step3")

    comparison = compare_study(study, units, step1_records, sae_records)
    verdict = make_verdict(study, comparison)
    timer.lap("compare")
    results = {
        "study": asdict(study),
        "out_dir": str(out_dir),
        "units": [
            {
                "name": u.name,
                "network": u.network,
                "kind": u.kind,
                "role": u.role,
                "config": u.config,
                "seed": u.seed,
                "layer_pos": u.layer_pos,
                "layer": u.backbone["layer"],
            }
            for u in units
        ],
        "stand_ins": stand_ins,
        "step1": {
            name: {k: rec[k] for k in ("metrics", "halves", "fingerprint", "joint")}
            for name, rec in step1_records.items()
        },
        "saes": sae_records,
        "comparison": comparison,
        "verdict": verdict,
        "work": {
            "saes_total": n_saes,
            "bank_jobs_trained": n_trained,
            "bank_jobs": len(jobs),
            "saes_evaluated": n_eval,
        },
        "timing_s": dict(timer.seconds),
        "timing_cpu_s": dict(timer.cpu_seconds),
    }
    if study.browser:
        results["browser"] = write_study_browser(results, out_dir)
        timer.lap("browser")
    _write_json(out_dir / RESULTS, results)
    from hsae.study.report import write_report

    report_path = write_report(results, out_dir, cfg.logger)
    timer.lap("report")
    results["timing_s"] = dict(timer.seconds)
    results["timing_cpu_s"] = dict(timer.cpu_seconds)
    _write_json(out_dir / RESULTS, results)
    log.info(
        "study %s: report %s (%s)",
        study.name,
        report_path,
        ", ".join(f"{k} {v:.0f} s" for k, v in timer.seconds.items()),
    )
    return results
