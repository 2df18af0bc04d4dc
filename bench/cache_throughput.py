"""Caching throughput against the backbone's forward-only rate, from pre-decoded images.

For each backbone: images already decoded and at the model's input size (float tensors in
[0, 1], so only normalisation is left to preprocessing), batch 256. It reports

- forward: the whole image tower (``encode_image`` for open_clip) on normalised batches;
- capture: hsae's hooked forward, stopping after the cached layer;
- cache: a full cache build (``get_or_build``: preprocessing, capture, token selection,
  float16 conversion, shard writes with checksums, manifest), images/s over its wall time.

Random weights (no downloads). Usage:
    python bench/cache_throughput.py [--backbones tiny_vit clip_vit_b32] [--device cpu]
        [--n-images N] [--rounds R] [--json out.json]
Each figure is the best of R interleaved rounds (other jobs on a shared machine only slow a
run down). The defaults keep the whole run under three minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict

import torch
from torch.utils.data import Dataset

from hsae.backbones import make_backbone
from hsae.cache import CacheRequest, get_or_build
from hsae.config import BackboneConfig
from hsae.data import SyntheticShapes

BACKBONES = {
    "tiny_vit": BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=2),
    "clip_vit_b32": BackboneConfig(
        name="clip_vit_b32", model_name="ViT-B-32", d_model=768, layer=10
    ),
    # The second GPU reference (timm ViT-B/16, 8,400 images/s on an H100).
    "timm_vit_b16": BackboneConfig(
        name="timm_vit_b16",
        loader="timm",
        model_name="vit_base_patch16_224",
        pretrained=None,
        d_model=768,
        layer=10,
    ),
}
# Images per measurement on a CPU; a GPU run should pass --n-images 8192 or more.
DEFAULT_IMAGES = {"tiny_vit": 2048, "clip_vit_b32": 256, "timm_vit_b16": 64}
DEFAULT_ROUNDS = {"tiny_vit": 3, "clip_vit_b32": 1, "timm_vit_b16": 1}


class PreDecoded(Dataset):
    """Decoded images at the model's size, labels from the synthetic hierarchy."""

    def __init__(self, images, source: SyntheticShapes):
        self.images, self.hierarchy, self.labels_nl = images, source.hierarchy, source.labels_nl
        self.transform = None
        self._key = time.time_ns()  # every run builds a new cache

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> dict:
        return {"name": "predecoded", "split": "train", "n": len(self), "run": self._key}

    def __getitem__(self, i):
        image = self.images[i]
        return (self.transform(image) if self.transform else image), i


def rate(fn, n_images: int, batch: torch.Tensor, device: torch.device) -> float:
    fn(batch[: min(8, len(batch))])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = 0
    while done < n_images:
        fn(batch)
        done += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def bench(name: str, n_images: int, device: torch.device, batch_size: int, rounds: int) -> dict:
    backbone = make_backbone(BACKBONES[name])
    h, _ = backbone.pre.size
    source = SyntheticShapes(min(n_images, 256), h, seed=0)
    decoded = torch.stack([source.render(i) for i in range(len(source))])
    images = decoded.repeat(-(-n_images // len(decoded)), 1, 1, 1)[:n_images]
    normalised = torch.stack([backbone.preprocess(im) for im in images[:batch_size]])
    batch = normalised.to(device)
    layer = BACKBONES[name].layer
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward(x):
        with torch.no_grad(), autocast:
            if hasattr(backbone.model, "encode_image"):
                backbone.model.encode_image(x)
            else:
                backbone._run(x)

    def capture(x):
        with autocast:
            backbone.capture(x, [layer])

    labels_source = SyntheticShapes(n_images, h, seed=0)
    request = CacheRequest(
        layer=layer, tokens="cls", dtype="float16", batch_size=batch_size, device=str(device)
    )
    n_timed = max(batch_size, n_images // 2)
    forward_rate = capture_rate = cache_rate = 0.0
    # The best of a few interleaved rounds: on a shared machine, other jobs only slow a run.
    for _ in range(rounds):
        backbone.model.to(device)
        forward_rate = max(forward_rate, rate(forward, n_timed, batch, device))
        capture_rate = max(capture_rate, rate(capture, n_timed, batch, device))
        backbone.model.to("cpu")
        dataset = PreDecoded(images, labels_source)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            cache = get_or_build(tmp, backbone, asdict(BACKBONES[name]), dataset, request)
            cache_rate = max(cache_rate, n_images / (time.perf_counter() - start))
    return {
        "backbone": name,
        "layer": layer,
        "batch": batch_size,
        "images": n_images,
        "rounds": rounds,
        "forward_img_s": round(forward_rate, 1),
        "capture_img_s": round(capture_rate, 1),
        "cache_img_s": round(cache_rate, 1),
        "cache_vs_forward": round(cache_rate / forward_rate, 3),
        "cache_vs_capture": round(cache_rate / capture_rate, 3),
        "rows": cache.n_rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="best of this many")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results = []
    for name in args.backbones:
        n_images = args.n_images or DEFAULT_IMAGES[name]
        rounds = args.rounds or DEFAULT_ROUNDS[name]
        results.append(bench(name, n_images, device, args.batch_size, rounds))
        r = results[-1]
        print(
            f"{name:14s} batch {r['batch']}: forward {r['forward_img_s']:>9.1f} img/s | capture "
            f"{r['capture_img_s']:>9.1f} img/s | cache {r['cache_img_s']:>9.1f} img/s "
            f"({100 * r['cache_vs_forward']:.0f}% of forward, "
            f"{100 * r['cache_vs_capture']:.0f}% of capture)",
            flush=True,
        )
    load = os.getloadavg()[0]
    print(f"machine: {machine}; load average {load:.1f} at the end (other jobs share it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "load_average": load, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
