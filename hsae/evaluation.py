"""Evaluate a finished run from its run dir alone (no Hydra state from training)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from hsae.cache import ActivationCache, resolve_device
from hsae.errors import HsaeError
from hsae.metrics import make_sae_metrics
from hsae.sae import WEIGHTS_FILE, load_sae

log = logging.getLogger(__name__)


def read_run_cfg(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise HsaeError(f"run_dir={run_dir} does not exist; pass the folder a train.py run wrote")
    for name in (WEIGHTS_FILE, "cfg.json"):
        if not (run_dir / name).exists():
            raise HsaeError(
                f"run_dir={run_dir} has no {name}: the training run did not finish "
                "(rerun it with the same hydra.run.dir to resume), or this is not a run dir"
            )
    return json.loads((run_dir / "cfg.json").read_text())


@torch.no_grad()
def evaluate_run(
    run_dir: str | Path, split: str = "val", batch_size: int = 4096, device: str = "auto"
) -> dict[str, float]:
    """Recompute the SAE metrics on a cached split; writes ``eval.json`` in the run dir."""
    run_dir = Path(run_dir).resolve()
    cfg = read_run_cfg(run_dir)
    if split not in cfg["cache"]:
        raise HsaeError(f"split={split!r} has no cache in this run; valid: {sorted(cfg['cache'])}")
    dev = resolve_device(device)
    sae = load_sae(run_dir).to(dev).eval()
    cache = ActivationCache.open(cfg["cache"][split])
    if cache.d_model != sae.d_model:
        raise HsaeError(
            f"cache {cache.path} has width {cache.d_model}, the SAE expects {sae.d_model}"
        )
    metrics = make_sae_metrics(sae.d_model, sae.n_latents).to(dev)
    for start in range(0, cache.n_rows, batch_size):
        x = cache.read(range(start, min(start + batch_size, cache.n_rows))).to(dev)
        out = sae(x)
        metrics.update(x, out.x_hat, out.codes)
    result = {name: float(value) for name, value in metrics.compute().items()}
    result["n_rows"] = cache.n_rows
    tmp = run_dir / ".eval.json.tmp"
    tmp.write_text(json.dumps({"split": split, "metrics": result}, indent=2) + "\n")
    tmp.replace(run_dir / "eval.json")
    return result


def format_table(metrics: dict[str, float]) -> str:
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{k:<{width}}  {v:.6g}" for k, v in metrics.items()]
    return "\n".join(lines)
