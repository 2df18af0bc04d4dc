"""How long the feature browser takes to build, and to load in a browser, at ImageNet scale:
24,576 latents over 50,000 images.

A synthetic problem of the target size, generated sparsely (never a dense [images x
latents] matrix): the 3-level label tree of bench/interp_scale.py (10 -> 100 -> 1,000
classes); each image fires ``--k`` latents, its 3 classes' planted latents (the first
1,110, one per class, as interp_scale plants the class directions) plus ``k - 3`` others
drawn with Zipf-like popularity (so densities spread over decades); images are 224 x 224
noise tinted by class, and with ``--patch-grid N`` each shown (image, latent) gets an
N x N heatmap (a blob), standing in for the SAE's patch codes. The browser is built with
hsae's own ``latent_table``, ``containment`` and ``build_site``, timed step by step with the
peak RSS of each (Linux VmHWM, reset per step).

``--page`` then serves the folder with Python's http.server and opens it in Debian's
Chromium (Playwright), timing the first page (data + the thumbnails on screen), a sort, a
search, and the page opened from disk. Results: docs/browser.md.

Usage: python bench/browser_scale.py [--images 50000] [--latents 24576] [--k 32]
    [--patch-grid 0] [--out /tmp/browser_scale] [--page] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from interp_scale import _peak_rss_bytes, _reset_peak_rss, machine, make_hierarchy

from hsae.browser import SiteInputs, build_site, containment, latent_table


def make_acts(args: argparse.Namespace):
    """``(acts [n, latents] CSC, labels [n, 3], hierarchy)``, sparse from the start."""
    rng = np.random.default_rng(args.seed)
    hierarchy = make_hierarchy(args.branching)
    labels = hierarchy.labels_from_leaves(rng.integers(hierarchy.n_leaves, size=args.images))
    offsets = np.cumsum([0] + [hierarchy.n_classes(lv) for lv in range(hierarchy.n_levels)])
    n_planted = min(int(offsets[-1]), args.latents)
    planted = np.minimum(labels + offsets[:-1], n_planted - 1)  # [n, levels] latent ids
    n_rest = args.latents - n_planted
    n_random = args.k - hierarchy.n_levels
    popularity = 1.0 / np.arange(1, n_rest + 1) ** 0.8
    popularity /= popularity.sum()
    others = n_planted + rng.choice(n_rest, size=(args.images, n_random), p=popularity)
    cols = np.concatenate([planted, others], axis=1)
    values = np.concatenate([
        rng.uniform(1, 3, size=planted.shape), rng.exponential(0.5, size=others.shape) + 0.01
    ], axis=1).astype(np.float32)  # fmt: skip
    rows = np.repeat(np.arange(args.images), cols.shape[1])
    acts = sp.csr_matrix((values.ravel(), (rows, cols.ravel())), shape=(args.images, args.latents))
    return acts.tocsc(), labels, hierarchy


def make_image_loader(labels: np.ndarray, size: int = 224):
    def load(row: int) -> np.ndarray:
        rng = np.random.default_rng(row)
        tint = np.array([labels[row, 0] * 25 % 256, labels[row, 1] * 7 % 256, labels[row, 2] % 256])
        noise = rng.integers(0, 64, size=(size, size, 3))
        return np.clip(tint + noise, 0, 255).astype(np.uint8)

    return load


def make_patch_maps(grid: int, acts: sp.csc_matrix):
    """A blob per (image, latent) peaking at the latent's activation on the image (as the
    per-image maximum over patches does)."""
    yy, xx = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def maps(rows: np.ndarray, pair_image: np.ndarray, pair_latent: np.ndarray) -> torch.Tensor:
        seed = rows[pair_image] * 7919 + pair_latent
        cy, cx = seed % grid, (seed // grid) % grid
        d2 = (yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2
        peak = np.asarray(acts[rows[pair_image], pair_latent]).ravel()[:, None, None]
        blobs = peak * np.exp(-d2 / 4.0)
        return torch.from_numpy(blobs.reshape(len(seed), -1).astype(np.float32))

    return maps


class Steps:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def step(self, name: str):
        _reset_peak_rss()
        start = time.perf_counter()
        yield
        self.rows.append((name, time.perf_counter() - start, _peak_rss_bytes()))
        print(f"  {name}: {self.rows[-1][1]:.1f} s, peak RSS {self.rows[-1][2] / 2**30:.2f} GiB",
              flush=True)  # fmt: skip


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def time_page(out: Path) -> list[tuple[str, float]]:
    """Seconds for the first page, a sort, a search, and the page from disk, in Chromium."""
    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def handle(self):  # the page navigating away mid-transfer is no error
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                super().handle()

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(out))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    # Every card filled from its shard, every thumbnail in the viewport decoded (the others
    # are lazy: the browser fetches them on scrolling).
    all_loaded = (
        "() => document.body.dataset.ready === '1' && [...document.querySelectorAll("
        "'article.latent')].every(a => a.querySelector('figure, .noimg')) && [...document"
        ".querySelectorAll('.thumb img')].filter(i => i.getBoundingClientRect().top < "
        "innerHeight).every(i => i.complete)"
    )
    out_rows = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path="/usr/bin/chromium", headless=True, args=args,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))

        def timed(name: str, action) -> None:
            page.evaluate("document.body.dataset.ready = ''")
            start = time.perf_counter()
            action()
            page.wait_for_function(all_loaded, timeout=120_000, polling=50)
            out_rows.append((name, time.perf_counter() - start))
            print(f"  {name}: {out_rows[-1][1]:.2f} s", flush=True)

        page.goto("about:blank")
        timed("first page (index + shards + thumbnails on screen), http.server",
              lambda: page.goto(url))  # fmt: skip
        heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : 0")
        out_rows.append(("JS heap after the first page (MiB)", heap / 2**20))
        timed("sort by purity (24 cards from up to 24 shards)",
              lambda: page.select_option("#sort", "purity"))  # fmt: skip
        timed("search a class name", lambda: page.fill("#search", "l1c7"))
        page.goto("about:blank")
        timed(
            "first page opened from disk (file://)",
            lambda: page.goto((out / "index.html").as_uri()),
        )
        assert not errors, errors
        context.close()
    httpd.shutdown()
    return out_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--latents", type=int, default=24_576)
    parser.add_argument("--k", type=int, default=32, help="latents firing per image")
    parser.add_argument("--branching", type=int, nargs="+", default=[10, 10, 10])
    parser.add_argument("--n-top", type=int, default=50, help="as evaluate.py")
    parser.add_argument("--n-show", type=int, default=12)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--thumb-size", type=int, default=96)
    parser.add_argument("--patch-grid", type=int, default=0, help="N: N x N heatmaps; 0: none")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "browser_scale")
    parser.add_argument("--page", action="store_true", help="time the page in Chromium")
    parser.add_argument(
        "--dense", action="store_true",
        help="pass the activations as a dense tensor, as evaluate.py holds them (4 bytes x images x latents)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine(torch.device('cpu'))}", flush=True)
    print(f"problem: {args.images} images, {args.latents} latents, k={args.k}, classes "
          f"{args.branching}, heatmaps {args.patch_grid or 'none'}", flush=True)  # fmt: skip
    steps = Steps()
    with steps.step("synthetic sparse activations (not part of the build)"):
        acts, labels, hierarchy = make_acts(args)
    source = torch.from_numpy(acts.toarray()) if args.dense else acts
    if args.dense:
        print(f"  dense input: {source.numel() * 4 / 2**30:.2f} GiB", flush=True)
    with steps.step("latent statistics (latent_table)"):
        table = latent_table(source, labels, hierarchy, n_top=args.n_top, n_show=args.n_show)
    with steps.step("co-activation containment (containment)"):
        containment(source, table)
    inputs = SiteInputs("browser_scale", hierarchy, table, labels, info={"tokens": "synthetic"})
    with steps.step("pages: thumbnails, heatmaps, data files, W&B picture (build_site)"):
        result = build_site(
            args.out, inputs, load_image=make_image_loader(labels),
            patch_maps=make_patch_maps(args.patch_grid, acts) if args.patch_grid else None,
            grid_hw=(args.patch_grid, args.patch_grid) if args.patch_grid else None,
            n_top=args.n_top, shard_size=args.shard_size, thumb_size=args.thumb_size,
        )  # fmt: skip
    build = steps.rows[1:]
    total = sum(r[1] for r in build)
    peak = max(r[2] for r in build)
    n_files, n_bytes = folder_size(result.path)
    data_files, data_bytes = folder_size(result.path / "data")
    print("\n| step | seconds | peak RSS GiB |\n|---|--:|--:|")
    for name, seconds, rss in steps.rows:
        print(f"| {name} | {seconds:.1f} | {rss / 2**30:.2f} |")
    for name, seconds in result.seconds.items():
        print(f"| - of which {name} | {seconds:.1f} | |")
    print(f"| **build total** | **{total:.1f}** | **{peak / 2**30:.2f}** |")
    print(f"\noutput: {n_files} files, {n_bytes / 2**20:.0f} MiB; data/: {data_files} files, "
          f"{data_bytes / 2**20:.1f} MiB (index.js {(result.path / 'data' / 'index.js').stat().st_size / 2**20:.1f} MiB)")  # fmt: skip
    print(f"containment over {table.contain_images} of {args.images} images; "
          f"scored latents {(table.level_k >= 0).sum()}")  # fmt: skip
    if args.page:
        print("\npage in Chromium:", flush=True)
        rows = time_page(result.path)
        print("\n| page action | seconds |\n|---|--:|")
        for name, seconds in rows:
            print(f"| {name} | {seconds:.2f} |")
    print(f"machine: {machine(torch.device('cpu'))}; load average {os.getloadavg()}")
    if os.environ.get("BROWSER_SCALE_KEEP") != "1":
        shutil.rmtree(result.path, ignore_errors=True)


if __name__ == "__main__":
    main()
