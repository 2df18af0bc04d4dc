"""How long step-3 evaluation takes at ImageNet scale: 24,576 latents over 50,000 images.

A synthetic problem of the target size: ``--images`` pooled rows of width ``--d`` whose
features sum one random direction per level of a 3-level label tree (10 -> 100 -> 1,000
classes, uniform leaves) plus noise; a TopK SAE with ``--latents`` latents and ``--k``,
random unit decoder rows with the tree's 1,110 class directions planted in the first ones
(so latents are pure enough to score); a fixed random reference embedding standing in for
the pixels. The rows go through hsae's own ``ActivationCache`` reader, ``image_pass`` and
``interpretability`` (hsae.evaluation), with the metric functions wrapped in timers, so
every metric is called exactly as ``evaluate.py run_dir=...`` calls it. ``max_decoder_cosine``
(also per run) and Moran's I (patch-token SAEs only; timed on ``--moran-images`` images of a
14 x 14 grid and scaled to ``--images``) are timed beside it.

The metrics run on ``--device``: ``image_pass``'s per-image tensors are moved there first
(``evaluate.py`` leaves them on the CPU). Results: docs/metrics.md, "How long evaluation takes".

Usage: python bench/interp_scale.py [--images 50000] [--latents 24576] [--d 768] [--k 32]
    [--device auto] [--threads N] [--branching 10 10 10] [--moran-images 64]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from hsae import evaluation
from hsae.backbones import POOLED_TOKEN
from hsae.cache import ActivationCache, resolve_device
from hsae.label_tree import Hierarchy
from hsae.metrics import interp
from hsae.sae.metrics import max_decoder_cosine
from hsae.sae.topk import TopKSAE

LEVEL_NAMES = ("coarse", "mid", "fine")
# The metric functions interp_metrics / interpretability call, timed where they are looked up.
TIMED = ("label_purity", "monosemanticity_score", "top_set_overlap", "sparse_probing",
         "absorption", "fidelity_metrics")  # fmt: skip
LABELS = {
    "label_purity": "purity, entropy, level, taxonomy depth (label_purity)",
    "monosemanticity_score": "MS score vs reference (monosemanticity_score)",
    "top_set_overlap": "uniqueness (top_set_overlap)",
    "sparse_probing": "sparse probing, k = 1, 2, 5 (sparse_probing)",
    "fidelity_metrics": "fidelity probes (fidelity_metrics)",
}


def make_hierarchy(branching: list[int]) -> Hierarchy:
    names, parents, n_above = [], [], 0
    for level, b in enumerate(branching):
        n = b * max(n_above, 1)
        names.append(tuple(f"l{level}c{c}" for c in range(n)))
        parents.append(tuple(-1 if level == 0 else c // b for c in range(n)))
        n_above = n
    return Hierarchy(LEVEL_NAMES[: len(branching)], tuple(names), tuple(parents))


def make_problem(args: argparse.Namespace):
    """Features, labels, cache, SAE and reference embedding of the synthetic problem."""
    gen = torch.Generator().manual_seed(args.seed)
    hierarchy = make_hierarchy(args.branching)
    leaves = torch.randint(hierarchy.n_leaves, (args.images,), generator=gen).numpy()
    labels_nl = hierarchy.labels_from_leaves(leaves)
    dirs = [
        F.normalize(torch.randn(hierarchy.n_classes(lvl), args.d, generator=gen), dim=1)
        for lvl in range(hierarchy.n_levels)
    ]
    # Coarse classes weigh most, as in a backbone whose features follow the tree.
    scales = [3.0, 2.0, 1.5][: hierarchy.n_levels]
    feats_nd = args.noise * torch.randn(args.images, args.d, generator=gen) / args.d**0.5
    for lvl, (dirs_cd, scale) in enumerate(zip(dirs, scales, strict=True)):
        feats_nd += scale * dirs_cd[torch.as_tensor(labels_nl[:, lvl])]
    manifest = {
        "tokens_per_image": 1,
        "token_index": [POOLED_TOKEN],
        "spec": {"tokens": "cls"},
        "dtype": "float32",
        "d_model": args.d,
        "hierarchy": hierarchy.to_dict(),
    }
    cache = ActivationCache(Path("synthetic"), manifest, [feats_nd.numpy()], labels_nl, None)

    torch.manual_seed(args.seed)
    sae = TopKSAE(args.d, args.latents, args.k)
    planted = torch.cat(dirs)[: args.latents]
    with torch.no_grad():
        sae.W_dec[: len(planted)] = planted
        sae.W_enc.copy_(sae.W_dec.T)
    # Like reference_embedding: one standardised row per image, fixed for every SAE compared.
    ref_ne = feats_nd @ torch.randn(args.d, args.ref_dim, generator=gen)
    ref_ne += 2 * torch.randn(ref_ne.shape, generator=gen) * ref_ne.std()
    ref_ne = (ref_ne - ref_ne.mean(dim=0)) / ref_ne.std(dim=0).clamp_min(1e-6)
    return cache, sae, ref_ne


class Timer:
    """Seconds and peak memory of each named step (host RSS; device memory on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[tuple[str, float, float, float]] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def step(self, name: str):
        _reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        seconds = time.perf_counter() - start
        gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        self.rows.append((name, seconds, _peak_rss_bytes(), gpu))
        print(f"  {name}: {seconds:.1f} s", flush=True)

    def wrap(self, name_of: Callable[..., str], fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.step(name_of(*args, **kwargs)):
                return fn(*args, **kwargs)

        return timed


def _reset_peak_rss() -> None:
    # Linux: writing 5 resets this process's peak RSS (VmHWM), so each step gets its own.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def step_name(fn_name: str) -> Callable[..., str]:
    if fn_name == "absorption":
        return lambda *a, level=0, **kw: f"absorption @ level {level} (absorption)"
    return lambda *a, **kw: LABELS[fn_name]


def time_moran(sae: TopKSAE, cache: ActivationCache, args, device, timer: Timer) -> None:
    """Moran's I on patch codes of ``--moran-images`` images (14 x 14 grid, ViT-B/16 at 224),
    rows = the image's pooled features plus per-patch noise; only ``update`` is timed."""
    h = w = 14
    gen = torch.Generator().manual_seed(args.seed + 1)
    feats = cache.read(np.arange(args.moran_images))
    moran = interp.MoranAccumulator(args.latents, (h, w), device)
    per_batch = max(1, args.batch_size // (h * w))
    seconds = 0.0
    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for start in range(0, args.moran_images, per_batch):
            x = feats[start : start + per_batch, None, :]
            x = x + 0.5 * torch.randn(x.shape[0], h * w, args.d, generator=gen) / args.d**0.5
            codes = sae(x.reshape(-1, args.d).to(device)).codes.float()
            timer.sync()
            begin = time.perf_counter()
            moran.update(codes.view(x.shape[0], h * w, -1))
            timer.sync()
            seconds += time.perf_counter() - begin
    name = f"Moran's I (MoranAccumulator.update), {args.moran_images} images x {h * w} patches"
    print(f"  {name}: {seconds:.1f} s", flush=True)
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    timer.rows.append((name, seconds, _peak_rss_bytes(), gpu))


def _gib(n_bytes: float) -> str:
    return "-" if math.isnan(n_bytes) else f"{n_bytes / 2**30:.1f}"


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs "
        f"({torch.get_num_threads()} torch threads), {mem:.0f} GiB RAM; python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text += f"; GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto: cuda when there is one")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--branching", type=int, nargs="+", default=[10, 10, 10])
    parser.add_argument("--noise", type=float, default=3.0, help="norm of the noise per row")
    parser.add_argument("--ref-dim", type=int, default=768, help="16 x 16 x 3 pixels")
    parser.add_argument("--batch-size", type=int, default=4096, help="as evaluate.py")
    parser.add_argument("--n-top", type=int, default=50, help="as evaluate.py")
    parser.add_argument("--moran-images", type=int, default=64, help="0: skip Moran's I")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"machine: {machine(device)}", flush=True)
    print(f"problem: {args.images} images, d={args.d}, {args.latents} latents, k={args.k}, "
          f"classes {args.branching} per level, device {device}", flush=True)  # fmt: skip

    timer = Timer(device)
    with timer.step("synthetic data and SAE (not part of evaluation)"):
        cache, sae, ref_ne = make_problem(args)
    sae = sae.to(device).eval()
    with timer.step("encoding pass (image_pass)"):
        images = evaluation.image_pass(sae, cache, args.batch_size, device)
        images.acts_ik = images.acts_ik.to(device)
        images.feats_id = images.feats_id.to(device)
        images.recon_id = images.recon_id.to(device)
    with timer.step("max_decoder_cosine"):
        max_cos = float(max_decoder_cosine(sae))

    with contextlib.ExitStack() as stack:
        for fn_name in TIMED:
            fn = timer.wrap(step_name(fn_name), getattr(interp, fn_name))
            stack.enter_context(mock.patch.object(interp, fn_name, fn))
        # In the module that defines interpretability (hsae.evaluation or a submodule).
        step3 = sys.modules[evaluation.interpretability.__module__]
        stack.enter_context(
            mock.patch.object(step3, "reference_embedding", lambda *a, **kw: ref_ne)
        )
        n_before = len(timer.rows)
        with timer.step("interpretability (all of it)"):
            metrics, skipped = evaluation.interpretability(
                sae, cache, images, {"dataset": {}}, "val", "edges", args.n_top, args.seed
            )
        whole = timer.rows.pop()
        parts = timer.rows[n_before:]
        rest = whole[1] - sum(r[1] for r in parts)
        # Its peak memory is not its own: the steps inside reset the peak.
        timer.rows.append(("input checks, the rest of interpretability", rest, math.nan, math.nan))

    if args.moran_images:
        time_moran(sae, cache, args, device, timer)
    del images

    evaluation_rows = [r for r in timer.rows if not r[0].startswith(("synthetic", "Moran"))]
    total = sum(r[1] for r in evaluation_rows)
    width = max(len(r[0]) for r in timer.rows)
    gpu = device.type == "cuda"
    print(f"\n| {'step':<{width}} | seconds | peak RSS GiB |" + (" peak GPU GiB |" if gpu else ""))
    print(f"|{'-' * (width + 2)}|--------:|-------------:|" + ("-------------:|" if gpu else ""))
    for name, seconds, rss, gpu_bytes in timer.rows:
        cells = f"| {name:<{width}} | {seconds:7.1f} | {_gib(rss):>12} |"
        print(cells + (f" {_gib(gpu_bytes):>12} |" if gpu else ""))
    peak = max(r[2] for r in evaluation_rows if not math.isnan(r[2]))
    print(f"| {'total (encoding pass + every metric)':<{width}} | {total:7.1f} |"
          f" {_gib(peak):>12} |")  # fmt: skip
    if args.moran_images:
        moran_s = next(r[1] for r in timer.rows if r[0].startswith("Moran"))
        print(f"\nMoran's I scaled to {args.images} images: "
              f"~{moran_s * args.images / args.moran_images:.0f} s (patch-token SAEs only; "
              "their encoding pass has 196x the rows)")  # fmt: skip
    print(f"machine: {machine(device)}")
    print(f"\nmax_decoder_cosine = {max_cos:.3f}; scored latents = "
          f"{metrics['interp/scored_latents']:.0f}; skipped: {skipped}")  # fmt: skip
    for key in sorted(metrics):
        print(f"  {key} = {metrics[key]:.4g}")


if __name__ == "__main__":
    main()
