"""The feature browser's numbers and files (hsae.browser), on a synthetic set of latents
with known meanings: family, shape and variant detectors of the synthetic label tree,
each firing exactly on its class's images, and one latent firing at random."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hsae.browser import SiteInputs, build_site, containment, latent_table
from hsae.browser.compare import read_data
from hsae.data.synthetic import HIERARCHY, SyntheticShapes

pytestmark = pytest.mark.usefixtures("one_thread")

N_IMAGES = 540
GRID = (4, 4)


def synthetic_latents(n_images: int = N_IMAGES, seed: int = 0):
    """``(acts [n, 40], labels [n, 3], dataset)``: latents 0-2 detect the 3 families, 3-11
    the 9 shapes, 12-38 the 27 variants (activation 1-2 on their class's images, 0 else),
    39 fires on a random half of the images."""
    dataset = SyntheticShapes(n_images, image_size=32, seed=seed, split="val")
    labels = dataset.labels_nl
    gen = np.random.default_rng(seed)
    columns = []
    for level in range(HIERARCHY.n_levels):
        for c in range(HIERARCHY.n_classes(level)):
            columns.append((labels[:, level] == c) * gen.uniform(1, 2, n_images))
    columns.append((gen.random(n_images) < 0.5) * gen.uniform(1, 2, n_images))
    acts = torch.as_tensor(np.stack(columns, axis=1), dtype=torch.float32)
    return acts, labels, dataset


def make_site(out_dir: Path, structure=None, title="synthetic", seed=0, heat=True):
    acts, labels, dataset = synthetic_latents(seed=seed)
    table = latent_table(acts, labels, HIERARCHY, n_top=20, n_show=6, block=16)
    containment(acts, table, block=16)

    def load(row: int) -> np.ndarray:
        return (dataset.render(row).permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    def patch_maps(rows, pair_image, pair_latent):
        # A blob whose corner depends on the latent: heatmaps that differ between latents.
        maps = torch.zeros(len(pair_image), GRID[0] * GRID[1])
        maps[torch.arange(len(pair_image)), torch.as_tensor(pair_latent) % 16] = 1.0
        return maps * acts[torch.as_tensor(rows[pair_image]), torch.as_tensor(pair_latent)][:, None]

    names = {k: (f"name{k % 5}", 0.1 + 0.01 * k) for k in range(0, 40, 2)}
    inputs = SiteInputs(title, HIERARCHY, table, labels, names, structure,
                        {"fvu": 0.25, "interp/purity@family": 0.9},
                        {"backbone": "synthetic", "layer": 2, "tokens": "patch", "arch": "test"})  # fmt: skip
    return build_site(
        out_dir, inputs, load_image=load, patch_maps=patch_maps if heat else None,
        grid_hw=GRID if heat else None, n_top=20, shard_size=16, thumb_size=32,
    ), table  # fmt: skip


def test_purest_level_follows_the_class_a_latent_detects():
    acts, labels, _ = synthetic_latents()
    table = latent_table(acts, labels, HIERARCHY, n_top=20, n_show=6, block=7)
    assert (table.level_k[:3] == 0).all() and (table.level_k[3:12] == 1).all()
    assert (table.level_k[12:39] == 2).all()
    # Detectors are pure at their own level; the random latent is not, at any level.
    own = np.concatenate(
        [table.purity_kl[:3, 0], table.purity_kl[3:12, 1], table.purity_kl[12:39, 2]]
    )
    assert own.min() == 1.0
    assert table.purity_kl[39].max() < 0.6  # margin >= 0.4 against a detector
    assert table.density_k[39] == pytest.approx(0.5, abs=0.1)
    assert table.density_k[:3] == pytest.approx(np.bincount(labels[:, 0]) / N_IMAGES)
    assert table.mean_act_k[:39] == pytest.approx(1.5, abs=0.15)
    # Top images: largest activation first, each a firing image of the latent.
    vals = table.show_value_ks
    assert (np.diff(vals, axis=1) <= 0).all() and (vals > 0).all()
    assert (labels[table.show_row_ks[12], 2] == 0).all()
    assert table.dist_count_kld[12, 2, 0] == table.n_top_k[12] == min(20, (labels[:, 2] == 0).sum())


def test_purity_level_and_depth_equal_label_purity():
    """The browser's purity numbers are eval.json's: against ``label_purity`` itself, on
    latents from pure to impure (random images firing above a detector's own)."""
    from hsae.metrics.interp import label_purity

    acts, labels, _ = synthetic_latents()
    gen = torch.Generator().manual_seed(3)
    swap = torch.rand(acts.shape, generator=gen) < 0.02
    noisy = torch.where(swap, 3 + torch.rand(acts.shape, generator=gen), acts)
    for a in (acts, noisy):  # no ties: their order is free ("ties: any order")
        mine = latent_table(a, labels, HIERARCHY, n_top=20, n_show=6, block=11)
        ref = label_purity(a, labels, HIERARCHY, n_top=20)
        np.testing.assert_allclose(mine.purity_kl, ref.purity_kl.numpy())
        np.testing.assert_allclose(mine.adjusted_kl, ref.adjusted_kl.numpy())
        np.testing.assert_allclose(mine.depth_k, ref.taxonomy_depth_k.numpy())
        np.testing.assert_array_equal(mine.level_k, ref.level_k.numpy())
    low = latent_table(noisy, labels, HIERARCHY, n_top=20, n_show=6)
    assert np.nanmax(low.purity_kl[3:12, 1]) < 0.7  # random images on top: margin > 0.3


def test_the_same_numbers_from_a_sparse_matrix_and_any_block_size():
    import scipy.sparse as sp

    acts, labels, _ = synthetic_latents()
    dense = latent_table(acts, labels, HIERARCHY, n_top=20, n_show=6, block=40)
    sparse = latent_table(
        sp.csc_matrix(acts.numpy()), labels, HIERARCHY, n_top=20, n_show=6, block=9
    )
    np.testing.assert_allclose(dense.purity_kl, sparse.purity_kl)
    np.testing.assert_array_equal(dense.show_row_ks, sparse.show_row_ks)
    np.testing.assert_array_equal(dense.level_k, sparse.level_k)


def test_containment_finds_the_parent_class_latent():
    acts, labels, _ = synthetic_latents()
    table = latent_table(acts, labels, HIERARCHY, n_top=20, n_show=6)
    containment(acts, table, block=8)
    parents = HIERARCHY.parents
    for shape in range(9):  # a shape's images are inside its family's
        assert table.contain_parent_k[3 + shape] == parents[1][shape]
        assert table.contain_score_k[3 + shape] == 1.0
    for variant in range(27):
        assert table.contain_parent_k[12 + variant] == 3 + parents[2][variant]
    # A family detector's only broader latent is the random one (fires on half the images),
    # which holds about half of its images: the low end, against 1.0 for a true parent.
    assert (table.contain_parent_k[:3] == 39).all()
    assert table.contain_score_k[:3].max() < 0.6
    assert table.contain_parent_k[39] == -1  # nothing fires more often than it
    # A budget too small for every image: a subset is used, and the answer is the same.
    subset = latent_table(acts, labels, HIERARCHY, n_top=20, n_show=6)
    containment(acts, subset, budget=float((table.image_nnz_n**2).sum()) / 2)
    assert subset.contain_images < N_IMAGES
    assert (subset.contain_parent_k[3:12] == table.contain_parent_k[3:12]).all()


def test_site_files(tmp_path):
    result, table = make_site(
        tmp_path / "browser", {"kind": "hierarchical", "n_parents": 8, "n_children": 4}
    )
    out = result.path
    for name in ("index.html", "app.js", "style.css", "manifest.json", "data/index.js"):
        assert (out / name).is_file(), name
    payload = read_data(out / "data" / "index.js")
    meta, cols = payload["meta"], payload["cols"]
    assert meta["n_latents"] == 40 and meta["grid"] == list(GRID) and meta["thumbs"] == "webp"
    assert cols["level"][:3] == [0, 0, 0] and cols["contain_parent"][3] == HIERARCHY.parents[1][0]
    assert cols["group"][:8] == [-1] * 8 and cols["group"][8:12] == [0] * 4
    assert meta["names"] and cols["name"][1] == -1 and math.isnan(cols["name_score"][1] or math.nan)
    shards = sorted((out / "data").glob("latents-*.js"))
    assert len(shards) == 3  # 40 latents, 16 per shard
    item = read_data(shards[0])[12]
    assert item["img"] == table.show_row_ks[12].tolist()
    heat = np.frombuffer(base64.b64decode(item["heat"][0]), np.uint8)
    assert heat.shape == (16,) and heat.argmax() == 12 % 16 and heat.max() > 100
    rows = np.unique(table.show_row_ks[table.show_row_ks >= 0])
    assert len(list((out / "thumbs").rglob("*.webp"))) == len(rows)
    media = result.wandb_media
    png = media["latents/top_images"]
    assert png.exists() and png.parent == out
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.dtype == np.uint8 and pixels.std() > 20  # images, not a blank/black grid
    assert media["latents/browser"]["rows"][0][4] == 1.0  # purest first
    # Rebuilding replaces the folder; nothing is left beside it.
    make_site(tmp_path / "browser", None, heat=False)
    assert json.loads((out / "manifest.json").read_text())["heatmaps"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["browser"]


def test_names_come_from_the_eval_json_table():
    from hsae.browser.run import names_from_record

    record = {"latents": {"columns": ["latent", "n_images", "name", "name_score", "name@family"],
                          "rows": [[3, 10, "circle", 0.41, "round"], [7, 2, "star", -0.05, "symbol"]]}}  # fmt: skip
    assert names_from_record(record) == {3: ("circle", 0.41), 7: ("star", -0.05)}
    assert names_from_record({"metrics": {}}) == {}
