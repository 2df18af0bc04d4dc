"""What the entry points share: user errors on one line, without a traceback."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

from hsae.errors import HsaeError


def user_errors_exit(task: Callable[..., Any]) -> Callable[..., Any]:
    """In a single run, an ``HsaeError`` prints ``error: ...`` and exits with status 2.

    In a multirun it propagates, so the launcher marks that job failed and goes on.
    """

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except HsaeError as e:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                # Into this job's log; the launcher records the failure and runs the rest.
                logging.getLogger("hsae").error("job failed: %s", e)
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@contextlib.contextmanager
def isolated_job(script: str) -> Iterator[None]:
    """Run one job of a multirun so that it leaves nothing behind for the next one, and
    so that Lightning's DDP relaunch of ranks > 0 reruns this job, not the whole sweep.

    Lightning starts the other ranks with this process's ``sys.argv`` plus
    ``hydra.run.dir=<hydra.run.dir>`` (``_hydra_subprocess_cmd``). In a multirun, ``sys.argv``
    holds the sweep (``-m``, comma lists) and ``hydra.run.dir`` is not the job's folder,
    so each rank would start a new sweep in stray folders (Hydra #2070, Lightning #11300).
    Here, for the job's duration, ``sys.argv`` is a single run of this job's overrides and
    ``hydra.run.dir`` the job's own folder: every rank trains the same job in one dir.
    Afterwards the process group is destroyed and the environment (``MASTER_PORT``,
    ``LOCAL_RANK``, ``WANDB_DIR``, ...) restored, so the next job starts clean.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_cfg = HydraConfig.get()
    argv, run_dir, environ = sys.argv, hydra_cfg.run.dir, dict(os.environ)
    sys.argv = [script, *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def check_ddp_launcher(strategy: str, devices: Any) -> None:
    """Multi-process DDP can't start inside joblib's worker processes: say what works."""
    if not HydraConfig.initialized() or "ddp" not in strategy:
        return
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    if "joblib" in launcher.lower():
        raise HsaeError(
            f"trainer.strategy={strategy} with hydra/launcher=joblib: DDP ranks cannot be started "
            "from joblib's workers. Use the basic launcher (jobs one after another, each on all "
            "GPUs), hydra/launcher=submitit_slurm (each SLURM task is a rank), or trainer=gpu "
            "with joblib (one device per job)"
        )


def job_labels() -> tuple[str | None, str | None]:
    """W&B run name and group for this job: in a multirun, the job's overrides and the
    sweep folder (so a sweep's runs group together); in a single run, neither."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, None
    hydra_cfg = HydraConfig.get()
    overrides = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
    sweep_dir = Path(hydra_cfg.sweep.dir)
    return overrides, f"{sweep_dir.parent.name}_{sweep_dir.name}"


def sweep_objective(
    metrics: dict[str, float], objective: str, target_l0: float | None, l0_penalty: float
) -> float:
    """The number a sweeper optimises: ``metrics[objective]``, plus a penalty on the distance
    to ``target_l0`` in log space when set (so fvu is compared at matched sparsity)."""
    if objective not in metrics:
        raise HsaeError(
            f"objective={objective!r} is not a metric of this run; valid: {', '.join(sorted(metrics))}"
        )
    value = float(metrics[objective])
    if target_l0 is not None:
        value += l0_penalty * abs(math.log(max(metrics["l0"], 1e-6) / target_l0))
    return value
