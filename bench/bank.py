"""An SAE bank of 8 TopK SAEs trained in one pass vs the same 8 trained one after another.

Two measurements, both on d=128 rows (the tiny ViT's cache of the synthetic images, built
once and not timed) and both checking that the bank's members end with the same weights as
the one-at-a-time runs:

- jobs: ``hsae.training.run.train`` once with ``bank=[8 entries]`` vs once per config (in
  this process, so Python start-up is not counted): what a user waits for, including each
  job's fixed costs (loading the cache into memory, b_pre init, Trainer set-up, final
  validation, writing the run dir).
- loop: only ``Trainer.fit`` of ``SAEModule`` over the same rows in memory, checkpoints
  and loggers off on both sides: the per-step cost of the bank.

Reported: the bank's wall time in units of one SAE's (the one-after-another total / 8);
8.0 would mean the bank saves nothing. Repeats alternate the two sides; the fastest and the
median run of each are shown.

Usage: python bench/bank.py [--rows 8192] [--epochs 2] [--repeats 3] [--threads 1]
                            [--width-divisor 1] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from hsae.config import RunConfig, register_configs, to_objects
from hsae.training.data import CacheDataModule
from hsae.training.module import SAEModule
from hsae.training.run import open_caches, train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BATCH = 1024
# (n_latents, k): three widths (4x, 8x, 16x d=128; --width-divisor shrinks them), k 8 to 64.
CONFIGS = [(512, 8), (512, 32), (1024, 8), (1024, 16), (1024, 32), (2048, 16), (2048, 32), (2048, 64)]  # fmt: skip


def bank_override() -> str:
    return "bank=[" + ",".join(f"{{n_latents:{n},k:{k}}}" for n, k in CONFIGS) + "]"


def job_config(base: list[str], *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


def time_jobs_bank(base: list[str], out: Path) -> tuple[float, list[Path]]:
    cfg = job_config(base, bank_override())
    start = time.perf_counter()
    train(cfg, out)
    seconds = time.perf_counter() - start
    return seconds, sorted((out / "bank").iterdir(), key=lambda p: int(p.name.split("_")[0]))


def time_jobs_one_by_one(base: list[str], out: Path) -> tuple[float, list[Path]]:
    seconds, dirs = 0.0, []
    for i, (n_latents, k) in enumerate(CONFIGS):
        cfg = job_config(base, f"sae.n_latents={n_latents}", f"sae.k={k}")
        start = time.perf_counter()
        train(cfg, out / str(i))
        seconds += time.perf_counter() - start
        dirs.append(out / str(i))
    return seconds, dirs


def same_files(a: list[Path], b: list[Path]) -> bool:
    for x, y in zip(a, b, strict=True):
        wx, wy = load_file(x / "sae.safetensors"), load_file(y / "sae.safetensors")
        if wx.keys() != wy.keys() or not all(torch.equal(wx[k], wy[k]) for k in wx):
            return False
    return True


def fit(module: SAEModule, train_loader: DataLoader, val_loader: DataLoader, epochs: int) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    return time.perf_counter() - start


def spec(n_latents: int, k: int) -> dict:
    return {"arch": "topk", "d_model": 128, "n_latents": n_latents, "k": k}


def time_loop_bank(data: CacheDataModule, epochs: int) -> tuple[float, list]:
    bank = [{"name": f"m{i}", "sae": spec(n, k), "lr": None} for i, (n, k) in enumerate(CONFIGS)]
    module = SAEModule(bank=bank, warmup_steps=10, seed=0)
    seconds = fit(module, data.train_dataloader(), data.val_dataloader(), epochs)
    return seconds, [sae.state_dict() for sae in module.saes]


def time_loop_one_by_one(data: CacheDataModule, epochs: int) -> tuple[float, list]:
    seconds, states = 0.0, []
    for n_latents, k in CONFIGS:
        module = SAEModule(sae=spec(n_latents, k), warmup_steps=10, seed=0)
        seconds += fit(module, data.train_dataloader(), data.val_dataloader(), epochs)
        states.append(module.sae.state_dict())
    return seconds, states


def alternate(repeats: int, bank_side, one_side, same) -> tuple[list[float], list[float], bool]:
    """Median-ready timings of both sides, alternating which goes first; ``same`` compares
    the first repeat's results."""
    bank_s, one_s, results = [], [], {}
    for repeat in range(repeats):
        sides = [("bank", bank_side), ("one", one_side)]
        for label, side in sides if repeat % 2 == 0 else sides[::-1]:
            seconds, result = side(repeat)
            (bank_s if label == "bank" else one_s).append(seconds)
            results.setdefault(label, result)
    return bank_s, one_s, same(results["bank"], results["one"])


def report(what: str, bank_s: list[float], one_s: list[float], same: bool) -> None:
    # On a shared machine other jobs only ever add time, so the fastest run of each side is
    # the least disturbed estimate (as timeit does); the median is shown next to it.
    print(f"{what}:")
    for label, runs in (("bank, one pass:   ", bank_s), ("one after another:", one_s)):
        print(
            f"  {label}  min {min(runs):7.2f} s  median {statistics.median(runs):7.2f} s"
            f"   (runs: {', '.join(f'{s:.2f}' for s in runs)})"
        )
    n = len(CONFIGS)
    print(
        f"  bank / one SAE:     min {min(bank_s) / (min(one_s) / n):5.2f} x  median "
        f"{statistics.median(bank_s) / (statistics.median(one_s) / n):5.2f} x   (8.0 = no saving)"
    )
    print(f"  same weights as one at a time: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192, help="training rows (images)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=None, help="reuse caches across bench runs")
    # One thread by default: on a shared 2-core machine a 2-thread matmul waits for its
    # slower thread whenever another process takes a core, which swamps what is measured.
    parser.add_argument("--threads", type=int, default=1)
    # Smaller SAEs: less compute per member per step, so the shared per-step cost weighs more.
    parser.add_argument("--width-divisor", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CONFIGS[:] = [(n // args.width_divisor, k) for n, k in CONFIGS]
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    register_configs()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = [
            "experiment=smoke",
            "logger=csv",
            f"cache.dir={args.cache_dir or tmp / 'cache'}",
            f"dataset.n_train={args.rows}",
            f"optim.batch_size={BATCH}",
            f"optim.epochs={args.epochs}",
            "optim.warmup_steps=10",
        ]
        caches = open_caches(to_objects(job_config(base), RunConfig))  # not timed
        steps = args.epochs * (args.rows // BATCH)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores visible, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
        )
        print(
            f"8 TopK SAEs on d=128 (widths {CONFIGS[0][0]}-{CONFIGS[-1][0]}, k 8-64), "
            f"{steps} steps of {BATCH} rows, "
            f"{args.repeats} repeats"
        )
        report(
            "jobs (hsae.training.run.train)",
            *alternate(
                args.repeats,
                lambda r: time_jobs_bank(base, tmp / f"bank{r}"),
                lambda r: time_jobs_one_by_one(base, tmp / f"one{r}"),
                same_files,
            ),
        )
        data = CacheDataModule(caches["train"], caches["val"], batch_size=BATCH, seed=0)
        data.setup()

        def same_states(a: list, b: list) -> bool:
            return all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)

        report(
            "loop (Trainer.fit only, rows in memory)",
            *alternate(
                args.repeats,
                lambda r: time_loop_bank(data, args.epochs),
                lambda r: time_loop_one_by_one(data, args.epochs),
                same_states,
            ),
        )


if __name__ == "__main__":
    main()
