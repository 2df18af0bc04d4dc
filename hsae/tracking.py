"""Experiment tracking: Lightning's ``WandbLogger`` (offline without credentials) or CSV.

All of W&B's files (runs, cache, config, artifact staging) go inside the run dir, so a
job leaves nothing in the home folder and an offline run can be synced later with the
``wandb sync`` command printed at the end. W&B is never allowed to kill training: if it
cannot start, the run falls back to CSV logs; if a later W&B call fails, it warns and
the run's local files (metrics.json, sae.safetensors) are written all the same.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import netrc
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from hsae.config import LoggerConfig
from hsae.rundir import RunDir

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode(requested: str | None) -> str:
    """``logger.mode`` when set, else ``WANDB_MODE``, else online only with credentials."""
    if requested:
        return requested
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if has_wandb_credentials() else "offline"


@contextlib.contextmanager
def wandb_guard(what: str) -> Iterator[None]:
    """Turn a W&B failure (network, quota, a bad media object) into a warning."""
    try:
        yield
    except Exception as e:  # W&B raises many types; none of them may stop training
        log.warning(
            "W&B: could not %s (%s: %s); local files are unaffected", what, type(e).__name__, e
        )


def make_logger(
    cfg: LoggerConfig,
    run_dir: Path,
    config_flat: dict[str, Any],
    name: str,
    tags: list[str],
    group: str | None = None,
    job_type: str = "train",
) -> Logger:
    csv = CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if cfg.kind == "csv":
        return csv
    wandb_dir = run_dir / "wandb"
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        os.environ[var] = str(wandb_dir / sub)
    os.environ["WANDB_DIR"] = str(run_dir)  # W&B adds its own "wandb/" below this
    wandb_dir.mkdir(parents=True, exist_ok=True)
    mode = wandb_mode(cfg.mode)
    try:
        logger = WandbLogger(
            name=name,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or group,
            tags=sorted(set(cfg.tags) | set(tags)),
            save_dir=str(run_dir),
            offline=mode == "offline",
            mode=mode,
            job_type=job_type,
            config=config_flat,
        )
        logger.experiment  # noqa: B018 - start the run now, so a failure falls back here
    except Exception as e:
        log.warning(
            "W&B could not start (%s: %s); logging to CSV in %s instead",
            type(e).__name__,
            e,
            run_dir / "csv",
        )
        return csv
    return logger


def log_summary(logger: Logger, metrics: dict[str, float]) -> None:
    """Final metrics as W&B summary keys (the names in docs/metrics.md)."""
    if isinstance(logger, WandbLogger):
        with wandb_guard("write the summary"):
            logger.experiment.summary.update(metrics)


def artifact_name(text: str) -> str:
    """W&B artifact names take letters, digits, ``-``, ``_`` and ``.`` only (run names,
    made of overrides like ``sae.k=8,expansion=16``, may hold more)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:128]


def log_artifacts(logger: Logger, run_dir: Path, cache_dirs: dict[str, Path], name: str) -> None:
    """The SAE as an artifact, the caches' manifests as references: the run's lineage."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    with wandb_guard("log the SAE artifact"):
        artifact = wandb.Artifact(name=artifact_name(f"sae-{name}"), type="sae")
        artifact.add_file(str(RunDir(run_dir).weights))
        artifact.add_file(str(RunDir(run_dir).cfg))
        logger.experiment.log_artifact(artifact)
    for split, cache_dir in cache_dirs.items():
        with wandb_guard(f"log the {split} cache reference"):
            ref = wandb.Artifact(name=f"cache-{Path(cache_dir).name}", type="activation-cache")
            ref.add_reference(f"file://{Path(cache_dir) / 'manifest.json'}", checksum=True)
            run = logger.experiment
            # An input of this run; offline runs cannot "use" artifacts, so they log it.
            (run.log_artifact if run.settings.mode == "offline" else run.use_artifact)(ref)


def replay_metrics(logger: Logger, csv_path: Path, prefix: str) -> None:
    """Log the curves of the ``prefix`` columns of a Lightning CSV metrics file, renamed
    without the prefix, at their steps: a bank member's ``<name>/train/loss`` becomes its
    own W&B run's ``train/loss``, exactly as a single run logs it."""
    if not isinstance(logger, WandbLogger):
        return
    with wandb_guard("replay the training curves"), open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            metrics = {
                key.removeprefix(prefix): float(value)
                for key, value in row.items()
                if key.startswith(prefix) and value != ""
            }
            if not metrics:
                continue
            if row.get("epoch"):
                metrics["epoch"] = int(float(row["epoch"]))
            logger.log_metrics(metrics, step=int(row["step"]))


def finish(logger: Logger) -> None:
    """Close the W&B run; for an offline run, say how to upload it."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    with wandb_guard("close the run"):
        run = logger.experiment
        offline = run.settings.mode == "offline"
        run_path = Path(run.dir).parent if run.dir else None
        wandb.finish()
        # End the W&B session too: the next run in this process (a bank member, a multirun
        # job) then reads its own WANDB_* folders instead of keeping this run's.
        wandb.teardown()
        if offline and run_path is not None:
            log.info("W&B run saved offline; upload it with: wandb sync %s", run_path)


def log_standalone_run(
    cfg: LoggerConfig,
    files_dir: Path,
    name: str,
    group: str | None,
    job_type: str,
    config_flat: dict[str, Any],
    summary: dict[str, Any],
    media: dict[str, Any] | None = None,
) -> None:
    """A W&B run outside training (``eval``, ``compare``): config, summary keys under the
    documented names, optional media (``{"key": path.png | list of rows + "columns"}``).
    Its files go in ``files_dir/wandb``; offline without credentials, like training."""
    if cfg.kind != "wandb":
        return
    with wandb_guard(f"log the {job_type} run"):
        logger = make_logger(cfg, files_dir, config_flat, name, [], group=group, job_type=job_type)
        if not isinstance(logger, WandbLogger):
            return
        import wandb

        run = logger.experiment
        for key, value in (media or {}).items():
            if isinstance(value, Path):
                run.log({key: wandb.Image(str(value))})
            elif isinstance(value, dict):
                run.log({key: wandb.Table(columns=value["columns"], data=value["rows"])})
        run.summary.update(summary)
        finish(logger)
