"""The checks that need the full HierarCaps test set (1,000 photos), which stays outside the
repository (the tests use the 32-photo fixture in tests/data/hierarcaps).

    HSAE_HIERARCAPS_DIR=/path/to/hierarcaps/images python bench/hierarcaps.py
    python bench/hierarcaps.py --images /path/to/hierarcaps/images

``images/`` holds the JPEGs, with ``hierarcaps_test.csv`` beside it (the layout of
TAU-VAILab/hierarcaps; ``HSAE_HIERARCAPS_DIR`` is the variable ``dataset=hierarcaps``
reads too). It checks and times, on all 1,000 rows:

1. the CSV: 1,000 chains of 4 captions, every photo present;
2. ``dataset=hierarcaps``: every photo in exactly one split, one class per coarsest caption,
   every photo decoded and preprocessed for ``tiny_vit`` (photos/s);
3. the joint-space metrics on the real chain structure: a radial embedding of the chains
   (specific captions farther from the root, as in tests/test_metrics_hierarchy.py) against
   one draw of random embeddings: Kendall tau, retrieval precision and recall.

Prints the figures and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hsae.backbones import make_backbone
from hsae.config import BackboneConfig, DatasetConfig
from hsae.data import make_dataset
from hsae.data.files import HIERARCAPS_CSV
from hsae.metrics.hierarcaps import hierarcaps_metrics, load_hierarcaps

N_ROWS = 1000


def radial_embedding(caption_ids_cl: np.ndarray, e: int = 128, seed: int = 0):
    """Each distinct caption at ``root + s u``, ``u`` a random direction orthogonal to the
    root and ``s`` growing with the shallowest level the caption appears at; each image is
    ``root + sum_j s_j u_j`` over its chain, plus noise (the test's construction)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(caption_ids_cl)
    n_captions = int(ids.max()) + 1
    level = torch.full((n_captions,), ids.shape[1])
    for j in range(ids.shape[1]):
        level[ids[:, j]] = torch.minimum(level[ids[:, j]], torch.tensor(j))
    root = F.normalize(torch.randn(e, generator=gen), dim=0)
    u = torch.randn(n_captions, e, generator=gen)
    u = F.normalize(u - (u @ root)[:, None] * root, dim=1)
    s = 0.5 * (level + 1).float() + 0.3 * torch.rand(n_captions, generator=gen)
    images = (
        root + (s[ids][..., None] * u[ids]).sum(1) + 0.1 * torch.randn(len(ids), e, generator=gen)
    )
    return images, (root + s[:, None] * u)[ids], root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=os.environ.get("HSAE_HIERARCAPS_DIR"))
    args = parser.parse_args()
    if not args.images or not Path(args.images).is_dir():
        print(
            f"error: no HierarCaps images folder at {args.images!r}; set HSAE_HIERARCAPS_DIR or "
            "pass --images to the full set's images/ (hierarcaps_test.csv beside it)",
            file=sys.stderr,
        )
        return 2
    images_dir = Path(args.images)
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            failures.append(what)

    print("1. CSV")
    hc = load_hierarcaps(images_dir.parent / HIERARCAPS_CSV, images_dir)  # raises if any is absent
    check(len(hc) == N_ROWS and hc.n_levels == 4, f"{len(hc)} chains of {hc.n_levels} captions")
    print(f"     {len(hc.captions)} distinct captions")

    print("2. dataset=hierarcaps")
    splits = [make_dataset(DatasetConfig(name="hierarcaps", path=str(images_dir)), s)
              for s in ("train", "val")]  # fmt: skip
    names = [{f.name for f in split.files} for split in splits]
    check(len(names[0]) + len(names[1]) == N_ROWS and not names[0] & names[1],
          f"train {len(names[0])} + val {len(names[1])} photos, disjoint")  # fmt: skip
    concepts = {chain[0] for chain in hc.chains}
    check(set(splits[0].hierarchy.class_names[0]) == concepts,
          f"{len(concepts)} classes, one per coarsest caption")  # fmt: skip
    backbone = make_backbone(
        BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=2)
    )
    start, n = time.perf_counter(), 0
    for split in splits:
        split.transform = backbone.preprocess
        for i in range(len(split)):
            image, _ = split[i]
            n += bool(torch.isfinite(image).all()) and image.shape == (3, 64, 64)
    seconds = time.perf_counter() - start
    check(n == N_ROWS, f"{n} photos decoded and preprocessed, {n / seconds:.0f} photos/s")

    print("3. joint-space metrics, radial embedding vs random (one draw)")
    ids = hc.caption_ids_cl
    image_emb, text_emb, root = radial_embedding(ids)
    high = hierarcaps_metrics(image_emb, text_emb, root, ids)
    gen = torch.Generator().manual_seed(1)
    low = hierarcaps_metrics(
        torch.randn(image_emb.shape, generator=gen),
        torch.randn(text_emb.shape, generator=gen),
        torch.randn(root.shape, generator=gen),
        ids,
    )
    for key in high:
        print(f"     {key:<28} radial {high[key]:.3f}  random {low[key]:.3f}")
    check(high["hier/kendall_tau"] > 0.9 and abs(low["hier/kendall_tau"]) < 0.1, "kendall tau")
    check(high["hier/retrieval_recall"] > 0.6 > 0.05 > low["hier/retrieval_recall"], "recall")
    check(high["hier/retrieval_precision"] > 0.4 > 0.05 > low["hier/retrieval_precision"],
          "precision")  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
