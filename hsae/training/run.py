"""One training job: activations cached, SAE trained, run dir written.

Run dir contents: ``sae.safetensors``, ``cfg.json`` (rebuilds the SAE and finds its caches
without Hydra), ``metrics.json`` (final validation metrics), ``checkpoints/`` (Lightning,
for resuming), and the W&B or CSV logs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms.functional import to_tensor

import hsae
from hsae.backbones import make_backbone
from hsae.cache import ActivationCache, CacheRequest, get_or_build
from hsae.config import RunConfig, flatten, to_objects
from hsae.data import make_dataset
from hsae.errors import HsaeError
from hsae.sae import sae_kwargs, save_sae
from hsae.tracking import finish, log_artifacts, log_summary, make_logger
from hsae.training.callbacks import LatentReport
from hsae.training.data import CacheDataModule
from hsae.training.module import SAEModule

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def build_caches(cfg: RunConfig) -> dict[str, Path]:
    """Build (or reuse) the train and val activation caches; returns their folders."""
    backbone = make_backbone(cfg.backbone)
    request = CacheRequest(
        layer=cfg.backbone.layer,
        tokens=cfg.backbone.tokens,
        dtype=cfg.cache.dtype,
        shard_rows=cfg.cache.shard_rows,
        batch_size=cfg.cache.batch_size,
        num_workers=cfg.cache.num_workers,
        device=cfg.cache.device,
    )
    return {
        split: get_or_build(
            cfg.cache.dir, backbone, asdict(cfg.backbone), make_dataset(cfg.dataset, split), request
        ).path
        for split in SPLITS
    }


def run_name(cfg: RunConfig) -> str:
    return f"{cfg.backbone.name}-l{cfg.backbone.layer}-{cfg.sae.arch}-n{cfg.sae.n_latents}-k{cfg.sae.k}"


# Keys that change how a run is logged or shown, not what it computes.
_COSMETIC = ("logger", "skip_finished", "trainer.enable_progress_bar", "trainer.log_every_n_steps")


def _what_it_computes(resolved: dict) -> dict:
    return {k: v for k, v in flatten(resolved).items() if not k.startswith(_COSMETIC)}


def finished_metrics(run_dir: Path, resolved: dict) -> dict[str, float] | None:
    """The metrics of a finished run in ``run_dir`` with this config, or None if unfinished.

    A finished run with a different config is an error, never silently reused.
    """
    if not (run_dir / "metrics.json").exists() or not (run_dir / "cfg.json").exists():
        return None
    stored = json.loads((run_dir / "cfg.json").read_text())["config"]
    old, new = _what_it_computes(stored), _what_it_computes(resolved)
    if old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise HsaeError(
            f"{run_dir} holds a finished run with a different config ({', '.join(changed[:5])}); "
            "choose another hydra.run.dir / hydra.sweep.dir, or set skip_finished=false to retrain"
        )
    return json.loads((run_dir / "metrics.json").read_text())


def _image_loader(cfg: RunConfig, split: str, size: int = 64):
    """Display images (``[3, size, size]`` in [0, 1]) by dataset index, for W&B grids."""
    dataset = make_dataset(cfg.dataset, split)
    dataset.transform = None

    def load(index: int) -> torch.Tensor:
        image = dataset[index][0]
        if not isinstance(image, torch.Tensor):
            image = to_tensor(image)
        return F.interpolate(
            image[None].float(), size=(size, size), mode="bilinear", antialias=True
        )[0]

    return load


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def train(
    cfg_dict: DictConfig, run_dir: str | Path, name: str | None = None, group: str | None = None
) -> dict[str, float]:
    """Run one job; returns the final validation metrics (also in ``metrics.json``).

    ``name`` (default: from the config) and ``group`` (default: ``logger.group``) label
    the W&B run; a multirun passes its overrides and sweep folder.
    """
    cfg: RunConfig = to_objects(cfg_dict, RunConfig)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg_dict, resolve=True)
    assert isinstance(resolved, dict)
    if cfg.skip_finished and (done := finished_metrics(run_dir, resolved)) is not None:
        log.info(
            "skipping %s: it already holds final metrics (skip_finished=false retrains)", run_dir
        )
        return done
    caches = build_caches(cfg)
    # Seed after caching: building a cache draws from the global RNG, and a run must start
    # the same whether its caches were built now or reused.
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    sae_cfg = sae_kwargs(cfg.sae, cfg.backbone.d_model)
    datamodule = CacheDataModule(
        caches["train"],
        caches["val"],
        batch_size=cfg.optim.batch_size,
        in_memory=cfg.optim.in_memory,
        num_workers=cfg.optim.num_workers,
        seed=cfg.seed,
    )
    module = SAEModule(
        sae=sae_cfg,
        lr=cfg.optim.lr,
        warmup_steps=cfg.optim.warmup_steps,
        decay_fraction=cfg.optim.decay_fraction,
    )
    last_ckpt = run_dir / "checkpoints" / "last.ckpt"
    if last_ckpt.exists():
        log.info("resuming from %s", last_ckpt)
    elif cfg.optim.b_pre_init != "zeros":
        module.sae.init_b_pre(datamodule.sample(4096, seed=cfg.seed), cfg.optim.b_pre_init)

    config_flat = flatten(resolved) | {"sae.lr": module.lr, "hsae.version": hsae.__version__}
    tags = [cfg.backbone.name, f"layer{cfg.backbone.layer}", cfg.sae.arch, cfg.dataset.name]
    name = name or run_name(cfg)
    logger = make_logger(cfg.logger, run_dir, config_flat, name, tags, group=group)
    val_cache = ActivationCache.open(caches["val"])
    report = LatentReport(
        _image_loader(cfg, "val"), list(val_cache.hierarchy.class_names[-1]), seed=cfg.seed
    )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision,
        max_epochs=cfg.optim.epochs,
        logger=logger,
        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True), report],
        default_root_dir=str(run_dir),
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # GlobalBatchSampler shards batches across ranks
    )
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(last_ckpt) if last_ckpt.exists() else None
    )
    (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {key.removeprefix("val/"): float(value) for key, value in final.items()}

    if trainer.is_global_zero:
        save_sae(module.sae, run_dir)
        _write_json(
            run_dir / "cfg.json",
            {
                "hsae_version": hsae.__version__,
                "sae": module.sae.config() | {"lr": module.lr},
                "cache": {split: str(path) for split, path in caches.items()},
                "backbone": asdict(cfg.backbone),
                "dataset": asdict(cfg.dataset),
                "seed": cfg.seed,
                "config": resolved,
            },
        )
        _write_json(run_dir / "metrics.json", metrics)
        log_summary(logger, metrics)
        log_artifacts(logger, run_dir, caches, name)
        finish(logger)
        log.info("run dir: %s", run_dir)
    return metrics
