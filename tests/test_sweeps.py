"""Multiruns as a user launches them: launchers, Optuna, shared caches, compare, W&B labels."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.wandb_offline import read_run

pytestmark = pytest.mark.slow


def train(*overrides: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return result


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").exists())


def test_basic_multirun_then_compare_pools_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    result = train(
        "-m", "experiment=smoke", "sae.k=4,8", "seed=0,1",
        f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = job_dirs(sweep)
    assert len(dirs) == 4
    assert all((d / "metrics.json").exists() for d in dirs)
    assert {d.name.split("_", 1)[1] for d in dirs} >= {"sae.k=4", "sae.k=8"}  # seed is excluded
    # Every job is one W&B run, named from its overrides, grouped by the sweep.
    runs = [read_run(d) for d in dirs]
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"]
    assert {r["name"] for r in runs} == {"sae.k=4", "sae.k=8"}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()

    compare = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"compare={sweep}", "x=sae.k", "y=dead_fraction"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert compare.returncode == 0, compare.stderr[-3000:]
    out = sweep / "compare"
    for name in (
        "runs.md",
        "runs.csv",
        "fvu_vs_l0.png",
        "dead_fraction_vs_n_latents.png",
        "dead_fraction_vs_sae.k.png",
    ):
        assert (out / name).stat().st_size > 0, name
    table = (out / "runs.md").read_text()
    assert "fvu_ci95" in table and "n_seeds" in table
    lines = [line for line in table.splitlines()[2:] if line.strip()]
    assert len(lines) == 2  # two k values, each pooled over two seeds
    compare_run = read_run(out)  # the comparison is a W&B run too (job_type compare)
    assert compare_run["job_type"] == "compare" and compare_run["summary"]["n_runs"] == 2
    assert "compare/runs/nrows" in compare_run["history_keys"]

    # Rerunning the same sweep into the same folder skips the finished jobs.
    again = train(
        "-m", "experiment=smoke", "sae.k=4,8", "seed=0,1",
        f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("skipping") == 4


def test_joblib_parallel_jobs_build_each_cache_once(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    result = train(
        "-m", "experiment=smoke", "logger=csv", "sae.k=2,4,8,16",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
        f"hydra.sweep.dir={sweep}", f"cache.dir={cache}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = job_dirs(sweep)
    assert len(dirs) == 4 and all((d / "metrics.json").exists() for d in dirs)
    logs = "".join((d / "train.log").read_text() for d in dirs)
    assert logs.count("building activation cache") == 2, logs  # train + val, once each
    assert logs.count("reusing activation cache") == 6
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    result = train(
        "-m", "experiment=smoke", "logger=csv", "sae.k=4,8",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = job_dirs(sweep)
    assert len(dirs) == 2 and all((d / "metrics.json").exists() for d in dirs)
    assert (sweep / ".submitit").is_dir()


def test_optuna_search_returns_the_objective(tmp_path):
    sweep = tmp_path / "sweep"
    result = train(
        "hparams_search=optuna_lr", "experiment=smoke", "logger=csv",
        "hydra.sweeper.n_trials=2", "target_l0=16",
        f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "optim.lr" in best and "best_value" in best
    fvus = [json.loads((d / "metrics.json").read_text())["fvu"] for d in job_dirs(sweep)]
    assert len(fvus) == 2
    # TopK with k=16 sits exactly at the target L0, so the objective is fvu itself.
    best_value = float(best.split("best_value:")[1].split()[0])
    assert best_value == pytest.approx(min(fvus), rel=1e-5)


def test_failing_job_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    result = train(
        "-m", "experiment=smoke", "logger=csv", "backbone.layer=7,1",
        f"hydra.sweep.dir={sweep}", f"cache.dir={tmp_path / 'cache'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    failed, good = job_dirs(sweep)
    assert "job failed: backbone.layer=7 is out of range" in (failed / "train.log").read_text()
    assert not (failed / "metrics.json").exists()
    assert (good / "metrics.json").exists()


def test_ddp_inside_multirun_one_dir_per_job_and_matches_one_process(tmp_path):
    """2 jobs x 2 gloo ranks with plain ddp: no second sweep, no stray dirs; each job
    equals a single-process run with the same global batch."""
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    ddp = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
    ]
    result = train(
        "-m", "experiment=smoke", "logger=csv", *ddp, "sae.k=8,16",
        f"hydra.sweep.dir={sweep}", f"cache.dir={cache}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = job_dirs(sweep)
    assert len(dirs) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "sweep"]
    assert result.stdout.count("Launching 2 jobs") + result.stderr.count("Launching 2 jobs") == 1
    for d in dirs:
        assert (d / "metrics.json").exists() and (d / "train_ddp_process_1.log").exists()

    single = tmp_path / "single"
    one = train(
        "experiment=smoke",
        "logger=csv",
        "sae.k=8",
        f"hydra.run.dir={single}",
        f"cache.dir={cache}",
        cwd=ROOT,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    ddp_metrics = json.loads((dirs[0] / "metrics.json").read_text())
    one_metrics = json.loads((single / "metrics.json").read_text())
    for name in ("fvu", "mse", "l0"):
        assert ddp_metrics[name] == pytest.approx(one_metrics[name], rel=1e-4), name
