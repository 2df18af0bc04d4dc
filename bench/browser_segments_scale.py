"""The feature browser's segment-token heatmaps (CAST, ``tokens=segments``) at ImageNet
scale: 24,576 latents over 50,000 images, ~196 superpixel tokens per image on a 28 x 28
stem grid (CAST-S at 224 px).

The latents are bench/browser_scale.py's synthetic ones (sparse, k per image). Each image's
segment map is one of 64 fixed Voronoi partitions of the stem grid (``--segments`` cells
around random centres), standing in for the cached segment tree; each shown (image, latent)
gets a blob over the segments peaking at the latent's activation on the image. Timed: the
latent statistics, then ``build_site`` with ``segments=`` (no thumbnails: their cost is
bench/browser_scale.py's), split into segment maps, heatmaps and data files.

Usage: python bench/browser_segments_scale.py [--images 50000] [--latents 24576] [--k 32]
    [--segments 196] [--grid 28] [--out /tmp/browser_segments_scale]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from browser_scale import Steps, folder_size, make_acts
from interp_scale import machine

from hsae.browser import SiteInputs, build_site, latent_table
from hsae.browser.media import SegmentHeat


def make_segment_heat(args: argparse.Namespace, acts) -> SegmentHeat:
    rng = np.random.default_rng(args.seed)
    grid, n_seg = args.grid, args.segments
    yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    cells = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float32)  # [cells, 2]
    centres = rng.uniform(0, grid, size=(64, n_seg, 2)).astype(np.float32)
    d2 = ((cells[None, :, None] - centres[:, None]) ** 2).sum(-1)  # [64, cells, segments]
    partitions = d2.argmin(-1).reshape(64, grid, grid)

    def maps(rows: np.ndarray) -> np.ndarray:
        return partitions[np.asarray(rows) % 64]

    def values(rows: np.ndarray, pair_image: np.ndarray, pair_latent: np.ndarray):
        image = rows[pair_image]
        seed = image * 7919 + pair_latent
        hot = centres[image % 64, seed % n_seg]  # [m, 2]: a blob around one segment
        d2 = ((centres[image % 64] - hot[:, None]) ** 2).sum(-1)  # [m, segments]
        peak = np.asarray(acts[image, pair_latent]).ravel()[:, None]
        return torch.from_numpy((peak * np.exp(-d2 / 8.0)).astype(np.float32))

    return SegmentHeat(values, maps, (grid, grid), n_seg, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--branching", type=int, nargs="+", default=[10, 10, 10])
    parser.add_argument("--segments", type=int, default=196)
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/browser_segments_scale")
    args = parser.parse_args()
    print(machine(torch.device("cpu")), flush=True)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    acts, labels, hierarchy = make_acts(args)
    steps = Steps()
    with steps.step("latent statistics (latent_table)"):
        table = latent_table(acts, labels, hierarchy)
    inputs = SiteInputs("segments scale", hierarchy, table, labels, info={"tokens": "segments"})
    segments = make_segment_heat(args, acts)
    begin = time.perf_counter()
    with steps.step("pages with segment heatmaps (build_site, no thumbnails)"):
        result = build_site(out, inputs, segments=segments)
    print(f"  build_site's steps: {result.seconds} ({time.perf_counter() - begin:.1f} s)")
    n_files, n_bytes = folder_size(out)
    segs = folder_size(out / "segs")
    data = folder_size(out / "data")
    n_shown = int((table.show_row_ks >= 0).sum())
    print(f"  {n_shown} shown (image, latent) pairs; {segs[0]} segment maps, "
          f"{segs[1] / 2**20:.1f} MiB; data {data[1] / 2**20:.1f} MiB; "
          f"all {n_files} files, {n_bytes / 2**20:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
