"""CAST-S images/s, superpixels included, next to ViT-S with the same settings.

Both at 224 px (random weights: speed does not depend on them), the same images (synthetic
shapes rendered at 256 px, so preprocessing resizes and crops as on photos), batch size,
device and threads. Reported per model:

- preprocess: ``resize_crop`` of one image in the main process (for CAST: SLIC or SEEDS,
  which dominates), images/s;
- forward: the model on preprocessed, normalised batches already on the device;
- end_to_end: a ``DataLoader`` with ``--workers`` processes preprocessing (superpixels in
  the workers, as the cache builder runs them), then normalisation and forward on the
  device: what caching activations costs per image.

Usage:
    python bench/cast_throughput.py [--device cpu|cuda] [--n-images 64] [--batch-size 32]
        [--workers 2] [--superpixels slic|seeds|auto] [--rounds 2] [--json out.json]
Each figure is the best of ``--rounds`` (other jobs on a shared machine only slow a run
down). The defaults take about two minutes on a 2-core CPU; on a GPU pass e.g.
``--device cuda --n-images 2048 --batch-size 256 --workers 16``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset

from hsae.backbones.cast import CastBackbone, make_authors_vit
from hsae.data import SyntheticShapes

log = logging.getLogger("cast_throughput")


class Rendered(Dataset):
    """Pre-rendered images, preprocessed by the backbone on access (in the workers)."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _forward(backbone, batch: torch.Tensor) -> None:
    if isinstance(backbone, CastBackbone):
        backbone.model(batch[:, :3], batch[:, 3].round().long())
    else:
        backbone.model(batch)


def _progress(backbone, phase: str, out: dict[str, float]) -> None:
    # The measuring process is spawned, without the parent's logging: print, flushed, so a
    # run cut short by a timeout still says how far it got.
    print(f"  {type(backbone).__name__} {phase}: {out}", flush=True)


def measure(backbone, images: torch.Tensor, args, device: torch.device) -> dict[str, float]:
    backbone.model.to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out: dict[str, float] = {}
    n_pre = min(len(images), args.n_preprocess)
    best = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        pre = [backbone.resize_crop(image) for image in images[:n_pre]]
        best = min(best, time.perf_counter() - t0)
    out["preprocess_img_s"] = n_pre / best
    _progress(backbone, "preprocess", out)
    batch = backbone.normalize(torch.stack(pre[: args.batch_size]).to(device))
    with torch.inference_mode(), autocast:
        _forward(backbone, batch)  # warm-up
        _sync(device)
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(max(1, args.n_forward // len(batch))):
                _forward(backbone, batch)
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / max(1, args.n_forward // len(batch)))
    out["forward_img_s"] = len(batch) / best
    _progress(backbone, "forward", out)
    loader = DataLoader(
        Rendered(images, backbone.resize_crop),
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        # This process was spawned, so its default start method is spawn too: each worker
        # would re-import torch and unpickle the model (over CUDA IPC on a GPU) every round.
        # Fork, as the cache builder's loader does from the main process; the workers only
        # preprocess on the CPU. Persistent: round 2 on is the steady state.
        multiprocessing_context="fork" if args.workers else None,
        persistent_workers=args.workers > 0,
    )
    best = float("inf")
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast:
            for batch in loader:
                _forward(backbone, backbone.normalize(batch.to(device, non_blocking=True)))
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    out["end_to_end_img_s"] = len(images) / best
    backbone.model.to("cpu")
    return {k: round(v, 2) for k, v in out.items()}


def _measure_named(name: str, args: argparse.Namespace) -> tuple[dict[str, float], str | None]:
    """``measure`` of one model, built in this (fresh) process; and its superpixel method."""
    if args.threads:
        torch.set_num_threads(args.threads)
    images = SyntheticShapes(args.n_images, image_size=256, seed=0)
    images = torch.stack([images.render(i) for i in range(args.n_images)])
    if name == "cast_s":
        backbone = CastBackbone("cast_s", f"cast_small.moco+{args.superpixels}", None)
    else:
        backbone = make_authors_vit("vit_s", "vit_small_patch16_224.moco", None)
    return measure(backbone, images, args, torch.device(args.device)), getattr(
        backbone, "superpixels", None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-images", type=int, default=64, help="images for end_to_end")
    parser.add_argument("--n-preprocess", type=int, default=16, help="images for preprocess")
    parser.add_argument("--n-forward", type=int, default=64, help="images for forward")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--superpixels", default="auto", choices=["auto", "slic", "seeds"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {}
    load_before = os.getloadavg()
    # Each model in a fresh process: measured in one process after CAST-S (its SLIC workers
    # and thread pools), ViT-S ran 14x slower than alone (1.14 vs 16 images/s on the CPU).
    spawn = multiprocessing.get_context("spawn")
    superpixels_used = None
    for name in ("cast_s", "vit_s"):
        log.info("measuring %s ...", name)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results[name], used = pool.submit(_measure_named, name, args).result()
        if name == "cast_s":
            superpixels_used = used
        log.info("%s: %s", name, results[name])
    report = {
        "settings": vars(args) | {"superpixels_used": superpixels_used},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "results": results,
        "cast_over_vit": {
            k: round(results["cast_s"][k] / results["vit_s"][k], 3) for k in results["vit_s"]
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
