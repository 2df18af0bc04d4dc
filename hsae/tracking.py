"""Experiment tracking: Lightning's ``WandbLogger`` (offline without credentials) or CSV.

All of W&B's files (runs, cache, config, artifacts staging) go inside the run dir, so a
job leaves nothing in the home folder and an offline run can be synced later with the
``wandb sync`` command printed at the end.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from hsae.config import LoggerConfig

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


def make_logger(
    cfg: LoggerConfig, run_dir: Path, config_flat: dict[str, Any], name: str, tags: list[str]
) -> Logger:
    if cfg.kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
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
    logger = WandbLogger(
        name=name,
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=sorted(set(cfg.tags) | set(tags)),
        save_dir=str(run_dir),
        offline=mode == "offline",
        mode=mode,
        job_type="train",
        config=config_flat,
    )
    return logger


def finish(logger: Logger, metrics: dict[str, float]) -> None:
    """Write the final metrics as W&B summary keys and close the run."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    run = logger.experiment
    run.summary.update(metrics)
    offline = run.settings.mode == "offline" or getattr(run, "offline", False)
    run_path = Path(run.dir).parent if run.dir else None
    wandb.finish()
    if offline and run_path is not None:
        log.info("W&B run saved offline; upload it with: wandb sync %s", run_path)
