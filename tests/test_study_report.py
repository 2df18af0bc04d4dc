"""The study's comparison, verdict and report on planted records (no training): the
verdict finds a planted step-3 difference and calls a null one inconclusive, identical
image towers are never called different, and every number in report.md is a number of
results.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hsae.study.compare import compare_study
from hsae.study.config import KindConfig, StudyConfig
from hsae.study.plan import Unit
from hsae.study.report import fmt, write_report
from hsae.study.verdict import make_verdict

LEVELS = ("family", "genus", "species")


def _study(**kw) -> StudyConfig:
    return StudyConfig(
        name="planted",
        kinds=[
            KindConfig(label="flat", role="baseline", backbones=["stand_in_flat"], seeds=[0, 1, 2]),
            KindConfig(
                label="hier", role="treatment", backbones=["stand_in_hier"], seeds=[0, 1, 2]
            ),
        ],
        expansions=[2, 4],
        ks=[4, 8, 16],
        sae_seeds=[0, 1],
        n_boot=500,
        **kw,
    )


def _units(study: StudyConfig) -> list[Unit]:
    return [
        Unit(kind.label, kind.role, kind.backbones[0], seed, 0, {"layer": 3, "init_seed": seed})
        for kind in study.kinds
        for seed in kind.seeds
    ]


def _records(study: StudyConfig, purity_gain: float, cpcc_gain: float, same_tower: bool = False):
    """Step-1 and SAE records with planted kind differences (noise from seeds and images)."""
    rng = np.random.default_rng(0)
    units = _units(study)
    step1 = {}
    for u in units:
        treat = u.role == "treatment"
        cpcc = 0.3 + cpcc_gain * treat + rng.normal(0, 0.02)
        metrics = {
            "hier/cpcc": cpcc,
            "hier/consistency": 0.8 + rng.normal(0, 0.01),
            "hier/full_path_acc": 0.7,
            "hier/mistake_severity": 1.5,
            "hier/ami@mean": 0.4,
        }
        halves = [{k: v + d for k, v in metrics.items()} for d in (0.01, -0.01)]
        step1[u.name] = {
            "metrics": metrics,
            "halves": halves,
            "fingerprint": "same" if same_tower else u.name,
            "joint": None,
        }
    saes = []
    for u in units:
        treat = u.role == "treatment"
        offset = rng.normal(0, 0.01)
        for s in study.sae_seeds:
            for e in study.expansions:
                for k in study.ks:
                    purity = (
                        0.4
                        + 0.05 * np.log2(k)
                        + purity_gain * treat
                        + offset
                        + rng.normal(0, 0.005)
                    )
                    m = {
                        "l0": float(k),
                        "fvu": 0.5 / np.log2(2 * k) + rng.normal(0, 0.005),
                        "dead_fraction": 0.01,
                        **{f"interp/purity@{lv}": purity for lv in LEVELS},
                        "interp/purity@mean": purity,
                        "interp/ms": 0.3 + rng.normal(0, 0.01),
                        "control/hit_gain": 0.2 + rng.normal(0, 0.05),
                    }
                    halves = [
                        {**m, "interp/purity@mean": purity + d, "interp/ms": m["interp/ms"] - d}
                        for d in (0.005, -0.005)
                    ]
                    halves = [
                        {kk: vv for kk, vv in h.items() if kk != "control/hit_gain"} for h in halves
                    ]
                    saes.append(
                        {
                            "unit": u.name,
                            "network": u.network,
                            "kind": u.kind,
                            "role": u.role,
                            "layer_pos": 0,
                            "layer": 3,
                            "sae_seed": s,
                            "expansion": e,
                            "k": k,
                            "run_dir": "x",
                            "metrics": m,
                            "halves": halves,
                        }
                    )
    return units, step1, saes


def _results(study, units, step1, saes):
    from dataclasses import asdict

    comparison = compare_study(study, units, step1, saes)
    return {
        "study": asdict(study),
        "units": [u.record() for u in units],
        "stand_ins": {
            u.network: {"store": "x", "metrics": {"acc@species": 0.95, "cpcc": 0.4}} for u in units
        },
        "step1": step1,
        "saes": saes,
        "comparison": comparison,
        "verdict": make_verdict(study, comparison),
        "work": {
            "saes_total": len(saes),
            "bank_jobs_trained": 0,
            "bank_jobs": 12,
            "saes_evaluated": 0,
        },
        "timing_s": {"stand_ins": 1.5, "step1": 2.25},
        "timing_cpu_s": {"stand_ins": 1.25, "step1": 2.0},
    }


def _statuses(results) -> dict[str, str]:
    return {f["family"]: f["status"] for f in results["verdict"]["layers"][0]["families"]}


def test_planted_difference_is_supported_and_null_inconclusive():
    study = _study()
    planted = _results(study, *_records(study, purity_gain=0.1, cpcc_gain=0.2))
    assert planted["comparison"]["paired"]
    assert planted["verdict"]["layers"][0]["precondition"]["holds"]
    status = _statuses(planted)
    assert status["hierarchy"] == "supported"
    effect = planted["verdict"]["layers"][0]["families"][1]["effect"]
    assert effect["estimate"] == pytest.approx(0.1, abs=0.02) and effect["ci_low"] > 0.05
    assert status["monosemanticity"] == "inconclusive at this size"
    assert status["absorption"] == "not applicable"  # no such metric in the records
    null = _results(study, *_records(study, purity_gain=0.0, cpcc_gain=0.0))
    assert not null["verdict"]["layers"][0]["precondition"]["holds"]
    assert _statuses(null)["hierarchy"] == "inconclusive at this size"


def test_identical_towers_are_never_called_different():
    study = _study()
    results = _results(study, *_records(study, purity_gain=0.1, cpcc_gain=0.2, same_tower=True))
    assert results["comparison"]["identical_towers"]
    status = _statuses(results)
    assert all(status[f] == "not applicable" for f in ("quality", "hierarchy", "monosemanticity"))


def _numbers(obj) -> set[str]:
    out = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= _numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out |= _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.add(fmt(obj))
    return out


NUMBER = re.compile(r"(?<![\w@./-])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w@/.])")


def report_numbers_match(report: Path, results_path: Path) -> list[str]:
    """Numbers printed in the report (outside code spans, names and file names) that are no
    number of results.json; empty when the report reads only logged results."""
    logged = _numbers(json.loads(results_path.read_text()))
    text = re.sub(r"`[^`]*`|\([^()\s]*\.png\)|\[[^\]]*\]\([^)]*\)", " ", report.read_text())
    text = re.sub(r"!\[[^\]]*\]", " ", text)
    text = re.sub(r"\b[Ss]teps? \d( and \d)?\b", " ", text)  # the stages' names, not numbers
    found = NUMBER.findall(text)
    assert found, "the report prints no numbers"
    return [n for n in found if n not in logged]


def test_report_numbers_are_the_logged_results(tmp_path):
    study = _study()
    results = _results(study, *_records(study, purity_gain=0.1, cpcc_gain=0.2))
    report = write_report(results, tmp_path, logger_cfg=None)
    from hsae.study.run import RESULTS
    from hsae.study.stages import write_json_record

    write_json_record(tmp_path / RESULTS, results)
    assert report_numbers_match(report, tmp_path / RESULTS) == []
    text = report.read_text()
    assert "Precondition (step 1) HOLDS" in text and "**supported**" in text
    for png in (
        "step1.png",
        "fvu_vs_l0_pos0.png",
        "metrics_vs_l0_pos0.png",
        "effects_vs_l0_pos0.png",
        "scatter_step1_vs_step3_pos0.png",
    ):
        assert (tmp_path / png).stat().st_size > 10_000, png
        assert f"]({png})" in text
    # The check itself catches a number that is not logged.
    report.write_text(text + "\nan unlogged number: 0.123456\n")
    assert report_numbers_match(report, tmp_path / RESULTS) == ["0.123456"]
