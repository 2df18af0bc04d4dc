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

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hsae.config import RunConfig, to_objects
from hsae.errors import HsaeError
from hsae.rundir import BANK_DIR, RunDir
from hsae.study import plan as plan_mod
from hsae.study.compare import compare_study, metric_value
from hsae.study.config import StudyConfig
from hsae.study.stages import (
    BackboneCache,
    Timer,
    clean_metrics,
    ensure_stand_ins,
    step1,
    step3,
    write_json_record,
)
from hsae.study.verdict import make_verdict

log = logging.getLogger("hsae.study")
RESULTS = "results.json"


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
        "train_metrics": clean_metrics(trained),
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
    write_json_record(
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
        "units": [u.record() for u in units],
        "stand_ins": stand_ins,
        "step1": {
            name: {k: rec[k] for k in ("metrics", "halves", "fingerprint", "joint")}
            | {"skipped": rec.get("skipped", {})}  # why a part_whole/* key is empty
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
    from hsae.study.report import write_report  # writes results.json with the scatter points

    report_path = write_report(results, out_dir, cfg.logger)
    timer.lap("report")
    results["timing_s"] = dict(timer.seconds)
    results["timing_cpu_s"] = dict(timer.cpu_seconds)
    write_json_record(out_dir / RESULTS, results)
    log.info(
        "study %s: report %s (%s)",
        study.name,
        report_path,
        ", ".join(f"{k} {v:.0f} s" for k, v in timer.seconds.items()),
    )
    return results
