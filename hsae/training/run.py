"""One training job: activations cached, SAE trained, run dir written.

Run dir contents: ``sae.safetensors``, ``cfg.json`` (rebuilds the SAE and finds its caches
without Hydra), ``metrics.json`` (final validation metrics), ``checkpoints/`` (Lightning,
for resuming), and the W&B or CSV logs.

A bank job (``bank=[...]``) trains its SAEs together and gives each member that same run
dir, with its own W&B run, under ``bank/<i>_<entry>/`` (e.g. ``bank/1_k-8_expansion-16/``);
the job dir holds ``bank.json`` (members, their dirs and metrics), the one checkpoint of the
whole bank, and the CSV logs of all members.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms.functional import to_tensor

import hsae
from hsae.backbones import make_backbone
from hsae.cache import ActivationCache, CacheRequest, get_or_build
from hsae.config import RunConfig, flatten, to_objects
from hsae.data import make_dataset
from hsae.errors import HsaeError
from hsae.rundir import RunDir, write_json
from hsae.sae import sae_kwargs, save_sae
from hsae.sae.metrics import max_decoder_cosine
from hsae.tracking import finish, log_artifacts, log_summary, make_logger, replay_metrics
from hsae.training.bank import Member, make_members
from hsae.training.callbacks import LatentReport
from hsae.training.data import CacheDataModule
from hsae.training.module import SAEModule

log = logging.getLogger(__name__)
SPLITS = ("train", "val")


def open_caches(cfg: RunConfig) -> dict[str, ActivationCache]:
    """Build (or reuse) the train and val activation caches; returns them opened.

    With ``dataset=activations`` the rows come from the user's array file: no backbone is
    loaded, and ``backbone.d_model`` must match the array's width.
    """
    request = CacheRequest.from_config(cfg.backbone, cfg.cache)
    if cfg.dataset.name == "activations":
        caches = {}
        for split in SPLITS:
            dataset = make_dataset(cfg.dataset, split)
            if dataset.d_model != cfg.backbone.d_model:
                raise HsaeError(
                    f"dataset.path has rows of width {dataset.d_model} but backbone.d_model="
                    f"{cfg.backbone.d_model}; set backbone.d_model={dataset.d_model}"
                )
            caches[split] = get_or_build(cfg.cache.dir, None, None, dataset, request)
        return caches
    backbone = make_backbone(cfg.backbone)
    return {
        split: get_or_build(
            cfg.cache.dir, backbone, asdict(cfg.backbone), make_dataset(cfg.dataset, split), request
        )
        for split in SPLITS
    }


def run_name(cfg: RunConfig) -> str:
    return f"{cfg.backbone.name}-l{cfg.backbone.layer}-{cfg.sae.arch}-n{cfg.sae.n_latents}-k{cfg.sae.k}"


# Keys that change how a run is logged or shown, not what it computes.
_COSMETIC = (
    "logger",
    "skip_finished",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "optim.on_device",  # the same batches, gathered on the GPU
    "optim.compile",  # the same step, fused
)


def _what_it_computes(resolved: dict) -> dict:
    return {k: v for k, v in flatten(resolved).items() if not k.startswith(_COSMETIC)}


def finished_metrics(run_dir: Path, resolved: dict) -> dict[str, float] | None:
    """The metrics of a finished run in ``run_dir`` with this config, or None if unfinished.

    A finished run with a different config is an error, never silently reused.
    """
    files = RunDir(run_dir)
    if not files.finished():
        return None
    stored = files.read_cfg()["config"]
    old, new = _what_it_computes(stored), _what_it_computes(resolved)
    # A key missing on one side equals null (cfg.json written before `bank` existed).
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        raise HsaeError(
            f"{run_dir} holds a finished run with a different config ({', '.join(changed[:5])}); "
            "choose another hydra.run.dir / hydra.sweep.dir, or set skip_finished=false to retrain"
        )
    return files.read_metrics()


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


def check_checkpoint(path: Path) -> None:
    """Refuse, with the file named and what to do, a ``last.ckpt`` Lightning cannot resume
    from: damaged, or not a checkpoint (torch's weights-only loading rightly refuses files
    whose unpickling would run code, with a message that asks to file a PyTorch issue).
    Memory-mapped, so the tensors are not read."""
    fix = (
        "delete it to train this run from the start (or restore it from a copy); hsae "
        "writes it at the end of every epoch"
    )
    import pickle
    import zipfile

    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        raise HsaeError(
            f"{path} is truncated or not a checkpoint (no complete torch.save archive); {fix}"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise HsaeError(
            f"{path} holds objects that loading would have to run code for, which hsae "
            f"refuses (nothing in it runs): it is not an hsae checkpoint; {fix}"
        ) from None
    except Exception as e:  # zip and storage errors alike: the archive is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HsaeError(f"{path} is truncated or damaged ({first}); {fix}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise HsaeError(f"{path} is not a Lightning checkpoint (no state_dict); {fix}")


def _member_metrics(final: dict[str, float], prefix: str) -> dict[str, float]:
    start = f"{prefix}val/"
    return {k.removeprefix(start): float(v) for k, v in final.items() if k.startswith(start)}


def _write_run_files(
    run_dir: Path,
    sae: torch.nn.Module,
    lr: float,
    cfg: RunConfig,
    resolved: dict,
    caches: dict[str, Path],
    metrics: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> None:
    """``sae.safetensors``, ``cfg.json``, then ``metrics.json``: its presence marks the run
    finished (``skip_finished``), so it is written last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_sae(sae, run_dir)
    write_json(
        RunDir(run_dir).cfg,
        {
            "hsae_version": hsae.__version__,
            "sae": sae.config() | {"lr": lr},
            "cache": {split: str(path) for split, path in caches.items()},
            "backbone": asdict(cfg.backbone),
            "dataset": asdict(cfg.dataset),
            "seed": cfg.seed,
            "config": resolved,
        }
        | (extra or {}),
    )
    write_json(RunDir(run_dir).metrics, metrics)


def _rows_per_epoch(n_rows: int, cfg: RunConfig) -> int:
    """Rows one epoch trains on: whole batches only (the last partial one is dropped)."""
    batch = min(cfg.optim.batch_size, n_rows)
    return n_rows // batch * batch


def _sae_spec(sae_cfg: Any, d_model: int, rows_per_epoch: int) -> dict[str, Any]:
    """Constructor arguments, with the dead-latent window resolved for this run."""
    kwargs = sae_kwargs(sae_cfg, d_model)
    if "dead_tokens_threshold" in kwargs:
        kwargs["dead_tokens_threshold"] = sae_cfg.dead_rows(rows_per_epoch)
    return kwargs


def _final_metrics(final: dict[str, float], prefix: str, sae: Any) -> dict[str, float]:
    """The member's validation metrics, its decoder geometry, and the L0 it aims at (next
    to the measured ``l0``: the study compares SAEs at matched L0)."""
    metrics = _member_metrics(final, prefix) | {
        "max_decoder_cosine": float(max_decoder_cosine(sae))
    }
    target = sae.l0_target()
    if target is not None:
        metrics["l0_target"] = float(target)
    return metrics


@dataclass(frozen=True)
class Layout:
    """How a job's members are named and where they are recorded: all that differs between
    a single SAE (``bank=null``: a bank of one, in the job's own dir) and a bank."""

    records: list[dict[str, Any]]
    """What each member's cfg.json holds beyond its run's config: ``tracking``, its W&B run's
    ``{"name", "group"}`` (so evaluate.py can file its results beside it), and a bank
    member's place in the bank."""
    listing: Path | None
    """The bank's ``bank.json`` (members, dirs, metrics); None for a single SAE."""

    @property
    def live(self) -> bool:
        """A single SAE's W&B run is the job's logger, its curves logged as it trains; a
        bank's job logs to CSV, each member's run written from it after training."""
        return self.listing is None

    def result(self, per_member: list[dict[str, float]]) -> Any:
        """What ``train`` returns: a single SAE's metrics, or the list of the members'."""
        return per_member[0] if self.live else per_member


def layout(
    cfg: RunConfig, members: list[Member], run_dir: Path, name: str | None, group: str | None
) -> Layout:
    """A single SAE's W&B run is ``name`` (default: ``run_name``); a bank member's is
    ``<name>,<entry label>`` (or ``<backbone>-l<layer>-<entry label>``), and without a
    group the members share one named after the job's dir."""
    if cfg.bank is None:
        run = {"name": name or run_name(cfg), "group": cfg.logger.group or group}
        return Layout([{"tracking": run}], None)
    prefix = f"{name}," if name else f"{cfg.backbone.name}-l{cfg.backbone.layer}-"
    group = cfg.logger.group or group or f"bank_{run_dir.parent.name}_{run_dir.name}"
    records = [
        {
            "bank": {"job_dir": str(run_dir), "index": m.index, "entry": m.entry},
            "tracking": {"name": f"{prefix}{m.label}", "group": group},
        }
        for m in members
    ]
    return Layout(records, RunDir(run_dir).bank)


def _bank_listing(run_dir: Path, members: list[Member], lrs: list[float] | None = None) -> list:
    return [
        {
            "index": m.index,
            "label": m.label,
            "entry": m.entry,
            "dir": str(m.run_dir.relative_to(run_dir)),
            "lr": None if lrs is None else lrs[m.index],
        }
        for m in members
    ]


def _check_resumable_bank(path: Path, run_dir: Path, resolved: dict, members: list[Member]) -> None:
    """A checkpoint holds one bank: resuming it with other entries is an error, not a
    state-dict mismatch deep in Lightning. Records the bank being trained in ``path``
    (``bank.json``)."""
    if RunDir(run_dir).last_ckpt.exists() and path.exists():
        stored = _what_it_computes(json.loads(path.read_text())["config"])
        new = _what_it_computes(resolved)
        changed = sorted(k for k in stored.keys() | new.keys() if stored.get(k) != new.get(k))
        if changed:
            raise HsaeError(
                f"{run_dir} holds the checkpoint of a bank with another config "
                f"({', '.join(changed[:5])}); choose another hydra.run.dir / hydra.sweep.dir, "
                "or delete its checkpoints/ to start over"
            )
    write_json(path, {"config": resolved, "members": _bank_listing(run_dir, members)})


def _open_run(cfg: RunConfig, member: Member, lr: float, run: dict[str, str | None]) -> Logger:
    """The member's W&B run (``cfg.logger``), in its dir, with the flat config of its run."""
    config_flat = flatten(member.resolved) | {"sae.lr": lr, "hsae.version": hsae.__version__}
    tags = [cfg.backbone.name, f"layer{cfg.backbone.layer}", member.sae.arch, cfg.dataset.name]
    return make_logger(cfg.logger, member.run_dir, config_flat, run["name"], tags, run["group"])


def _finish_member_run(
    job_logger: Logger,
    live: bool,
    cfg: RunConfig,
    member: Member,
    sae: torch.nn.Module,
    lr: float,
    metrics: dict[str, float],
    run: dict[str, str | None],
    caches: dict[str, Path],
    report: LatentReport,
    val_cache: ActivationCache,
    device: torch.device,
) -> None:
    """Complete the member's own W&B run: flat config, curves, summary, latent report, SAE
    artifact, as a single run of its config has them. A ``live`` run is the job's logger,
    its curves and latent report (``LatentReport``) logged during training; otherwise it is
    opened now, its curves replayed from the job's CSV under the single-run keys. W&B
    failures only warn."""
    logger = job_logger if live else _open_run(cfg, member, lr, run)
    if not live:
        csv_path = Path(job_logger.experiment.metrics_file_path)
        replay_metrics(logger, csv_path, prefix=f"{member.name}/")
    log_summary(logger, metrics)
    if not live and isinstance(logger, WandbLogger):
        report.log_to(logger, sae, val_cache, device)
    log_artifacts(logger, member.run_dir, caches, run["name"])
    finish(logger)


def train(
    cfg_dict: DictConfig, run_dir: str | Path, name: str | None = None, group: str | None = None
) -> dict[str, float] | list[dict[str, float]]:
    """Run one job; returns the final validation metrics (also in ``metrics.json``), or for
    a bank (``bank=[...]``) each member's, in bank order (``train.py`` hands a sweeper the
    best member's objective).

    ``name`` (default: from the config) and ``group`` (default: ``logger.group``) label
    the W&B runs (see ``layout``); a multirun passes its overrides and sweep folder.
    """
    cfg: RunConfig = to_objects(cfg_dict, RunConfig)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg_dict, resolve=True)
    assert isinstance(resolved, dict)
    members = make_members(cfg, resolved, run_dir)  # a bad bank entry fails before any work
    job = layout(cfg, members, run_dir, name, group)
    if cfg.skip_finished:
        done = [finished_metrics(m.run_dir, m.resolved) for m in members]
        if all(metrics is not None for metrics in done):
            log.info(
                "skipping %s: it already holds final metrics (skip_finished=false retrains)",
                run_dir,
            )
            return job.result(done)  # type: ignore[arg-type]
    if job.listing:
        _check_resumable_bank(job.listing, run_dir, resolved, members)
    opened = open_caches(cfg)  # opened once: the job reads their sizes and labels too
    caches = {split: cache.path for split, cache in opened.items()}
    # Seed after caching: building a cache draws from the global RNG, and a run must start
    # the same whether its caches were built now or reused.
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = CacheDataModule(
        opened["train"],
        opened["val"],
        batch_size=cfg.optim.batch_size,
        in_memory=cfg.optim.in_memory,
        on_device=cfg.optim.on_device,
        num_workers=cfg.optim.num_workers,
        seed=cfg.seed,
    )
    # Every member is built from the same seed (see SAEModule), so a bank member starts
    # where a single run of its config starts.
    rows_per_epoch = _rows_per_epoch(opened["train"].n_rows, cfg)
    specs = [
        {"name": m.name, "sae": _sae_spec(m.sae, cfg.backbone.d_model, rows_per_epoch), "lr": m.lr}
        for m in members
    ]
    module = SAEModule(
        bank=specs,
        warmup_steps=cfg.optim.warmup_steps,
        decay_fraction=cfg.optim.decay_fraction,
        seed=cfg.seed,
        compile=cfg.optim.compile,
    )
    last_ckpt = RunDir(run_dir).last_ckpt
    if last_ckpt.exists():
        check_checkpoint(last_ckpt)
        log.info("resuming from %s", last_ckpt)
    else:
        sample = datamodule.sample(4096, seed=cfg.seed)
        for sae in module.saes:
            if cfg.optim.normalize_inputs:
                sae.set_input_scale(sample)
            if cfg.optim.b_pre_init != "zeros":
                sae.init_b_pre(sample, cfg.optim.b_pre_init)

    val_cache = opened["val"]
    report = LatentReport(
        _image_loader(cfg, "val"), list(val_cache.hierarchy.class_names[-1]), seed=cfg.seed
    )
    # The job's logger: a single SAE's own W&B run, live; a bank's CSV in the job's dir, from
    # which each member's W&B run is written after training. The report logs into the job's
    # W&B run when fitting ends, so only a single SAE's (a bank member's comes with its run).
    logger = (
        _open_run(cfg, members[0], module.lrs[0], job.records[0]["tracking"])
        if job.live
        else make_logger(replace(cfg.logger, kind="csv"), run_dir, {}, "", [])
    )
    callbacks: list[L.Callback] = [
        ModelCheckpoint(dirpath=RunDir(run_dir).last_ckpt.parent, save_last=True),
        report,
    ]
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.strategy,
        num_nodes=cfg.trainer.num_nodes,
        precision=cfg.trainer.precision,
        max_epochs=cfg.optim.epochs,
        logger=logger,
        callbacks=callbacks,
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
    # Nothing after fit trains: in training mode BatchTopK would select over val rows and
    # move its threshold, and AuxK would count them. Eval mode, no gradients: the files
    # written below are the SAEs of the last checkpoint, scored as they will be used.
    module.eval()
    with torch.no_grad():
        (final,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        results = [
            _final_metrics(final, module.metric_prefix(i), sae) for i, sae in enumerate(module.saes)
        ]
        if trainer.is_global_zero:
            per_member = list(
                zip(members, module.saes, module.lrs, results, job.records, strict=True)
            )
            for member, sae, lr, metrics, record in per_member:
                _write_run_files(
                    member.run_dir, sae, lr, cfg, member.resolved, caches, metrics, record
                )
            if job.listing:
                listing = _bank_listing(run_dir, members, module.lrs)
                for entry, metrics in zip(listing, results, strict=True):
                    entry["metrics"] = metrics
                write_json(job.listing, {"config": resolved, "members": listing})
            for member, sae, lr, metrics, record in per_member:
                _finish_member_run(
                    logger, job.live, cfg, member, sae, lr, metrics, record["tracking"], caches,
                    report, val_cache, module.device,
                )  # fmt: skip
            log.info("run dir: %s", run_dir)
    return job.result(results)
