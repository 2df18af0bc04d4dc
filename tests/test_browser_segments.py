"""Heatmaps over CAST's segment tokens (``tokens=segments``) and over ``tokens=all``.

A random-init tiny CAST caches its segment tokens of 64 px synthetic images; a hand-set SAE
whose latent 0 fires strongly (5.0) on exactly one segment token of one image and weakly
(0.1) on every other row must give a painted map that is 255 on exactly that segment's
stem-grid cells and at most 5 (= 0.1 / 5.0 * 255) everywhere else: in Python
(``paint_segments``), in the written data files, and drawn by the page in Chromium. Then a
real run: an SAE trained for a few steps on those tokens, evaluated with its browser.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hsae.backbones.cast import CastBackbone
from hsae.browser import SiteInputs, build_site, evaluate_with_browser, latent_table
from hsae.browser.compare import read_data
from hsae.browser.media import paint_segments, segs_path
from hsae.browser.run import all_tokens_grid, heat_sources, segment_heat
from hsae.cache import CacheRequest, get_or_build
from hsae.data import SyntheticShapes
from hsae.evaluation.inputs import image_pass
from tests.conftest import TINY
from tests.test_browser_page import Page, chromium  # noqa: F401 - the Chromium fixture

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"loader": "cast", "model_name": "cast_tiny+slic", "pretrained": None}
N_IMAGES = 12
HOT, COLD = 5.0, 0.1
COLD_MAX = round(COLD / HOT * 255)  # 5: what a cold segment may be painted with
CPU = torch.device("cpu")


class HotRow(torch.nn.Module):
    """Latent 0: ``HOT`` on the one row equal to ``target``, ``COLD`` on every other row;
    latent 1: 1.0 everywhere (a second latent, never hot)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.d_model, self.n_latents = target.shape[0], 2

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        hot = (x == self.target).all(dim=-1)
        codes = torch.stack([torch.where(hot, HOT, COLD), torch.ones(len(x))], dim=1)
        return SimpleNamespace(codes=codes, x_hat=x)


@pytest.fixture(scope="module")
def data() -> SyntheticShapes:
    return SyntheticShapes(N_IMAGES, image_size=64, seed=5, split="val")


@pytest.fixture(scope="module", params=[0, 2], ids=["stage1-superpixels", "stage3-segments"])
def hot_case(request, tmp_path_factory, data):
    """A cache at ``layer`` (0: superpixel tokens; 2: the third stage's pooled segments),
    the hot row (image 3's token whose segment covers the most cells), and the hand-set SAE."""
    layer = request.param
    tiny = CastBackbone("cast_tiny", "cast_tiny+slic", None, init_seed=0)
    req = CacheRequest(layer=layer, tokens="segments", dtype="float32", batch_size=4)
    cache = get_or_build(tmp_path_factory.mktemp(f"seg-cache-{layer}"), tiny, CFG, data, req)
    image = 3
    levels = cache.segment_trees().levels(image)
    token = int(np.bincount(levels[layer].ravel()).argmax())
    rows = np.arange(cache.n_rows)
    (hot_row,) = rows[(cache.row_image(rows) == image) & (cache.row_token(rows) == token)]
    sae = HotRow(cache.read(np.array([hot_row]))[0])
    return SimpleNamespace(
        layer=layer, cache=cache, image=image, token=token, map_hw=levels[layer], sae=sae
    )


def assert_hot_exactly_on(painted_hw: np.ndarray, hot_hw: np.ndarray) -> None:
    assert hot_hw.any() and (~hot_hw).any()  # both kinds of cell exist
    assert (painted_hw[hot_hw] == 255).all()
    assert painted_hw[~hot_hw].max() <= COLD_MAX


def test_paint_segments_gives_each_cell_its_segments_value():
    ids = np.array([[0, 0, 2], [1, 2, 2], [-1, 7, 1]])
    heat = np.array([10, 200, 30], np.uint8)
    painted = paint_segments(ids, heat)
    assert painted.tolist() == [[10, 10, 30], [200, 30, 30], [0, 0, 200]]  # -1, 7: no token


def test_segment_heat_paints_the_hot_segment(hot_case):
    case = hot_case
    seg = segment_heat(case.sae, case.cache, np.arange(N_IMAGES), CPU)
    assert seg.stage == case.layer and seg.grid_hw == (8, 8)
    assert seg.n_tokens == int(case.cache.row_token(np.arange(case.cache.n_rows)).max()) + 1
    map_hw = seg.maps(np.array([case.image]))[0]
    np.testing.assert_array_equal(map_hw, case.map_hw)  # the cached tree at the hooked stage
    values = seg.values(np.array([case.image, 0]), np.array([0, 1, 0]), np.array([0, 0, 1]))
    assert values.shape == (3, seg.n_tokens)
    assert values[0, case.token] == HOT and values[2].max() == 1.0
    heat_t = np.clip(values[0].numpy() / HOT * 255 + 0.5, 0, 255).astype(np.uint8)
    assert_hot_exactly_on(paint_segments(map_hw, heat_t), case.map_hw == case.token)


def hot_site(case, data, out_dir: Path):
    """The browser of the hand-set SAE's two latents over the cache (thumbnails included)."""
    images = image_pass(case.sae, case.cache, 4096, CPU)
    labels = case.cache.labels_nl[images.image_ids]
    table = latent_table(images.acts_ik, labels, case.cache.hierarchy, n_top=N_IMAGES, n_show=4)
    heat_args, note = heat_sources(case.sae, case.cache, images.image_ids, CPU)
    inputs = SiteInputs("hot segment", case.cache.hierarchy, table, labels,
                        info={"tokens": "segments", "heatmaps": note})  # fmt: skip

    def load(row: int) -> np.ndarray:
        return (data.render(int(images.image_ids[row])).permute(1, 2, 0).numpy() * 255).astype(
            np.uint8
        )

    result = build_site(out_dir, inputs, load_image=load, thumb_size=64, **heat_args)
    return result, table, images


def test_site_files_and_page_paint_the_hot_segment(hot_case, data, chromium, tmp_path):  # noqa: F811
    case = hot_case
    result, table, images = hot_site(case, data, tmp_path / "browser")
    out = result.path
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["heatmaps"] is True and manifest["heat_kind"] == "segments"
    meta = read_data(out / "data" / "index.js")["meta"]
    assert meta["grid"] is None and meta["segments"]["grid"] == [8, 8]
    assert meta["segments"]["bytes"] == 1 and meta["segments"]["stage"] == case.layer
    row = int(np.flatnonzero(images.image_ids == case.image)[0])
    assert table.show_row_ks[0, 0] == row  # the hot image ranks first for latent 0
    item = read_data(next((out / "data").glob("latents-*.js")))[0]
    heat_t = np.frombuffer(base64.b64decode(item["heat"][0]), np.uint8)
    ids = np.frombuffer(base64.b64decode(read_data(out / segs_path(row))), np.uint8)
    painted = paint_segments(ids.reshape(8, 8).astype(np.int64), heat_t)
    assert_hot_exactly_on(painted, case.map_hw == case.token)
    # One map per shown image, none for the others.
    assert len(list((out / "segs").rglob("*.js"))) == len(
        np.unique(table.show_row_ks[table.show_row_ks >= 0])
    )

    # The page draws the same: the alpha of each canvas pixel (8 x 8, one per stem cell).
    page = Page(chromium, (out / "index.html").as_uri())
    p = page.page
    selector = f"article.latent[data-latent='0'] .thumb:has(img[alt='image {row}']) canvas.heat"
    p.wait_for_selector(selector + "[data-painted='1']", timeout=10_000)
    alpha = p.evaluate(
        "(sel) => { const c = document.querySelector(sel);"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " const a = []; for (let i = 3; i < d.length; i += 4) a.push(d[i]); return a; }",
        selector,
    )
    alpha_hw = np.asarray(alpha).reshape(8, 8)
    hot = case.map_hw == case.token
    # app.js's colour scale: alpha 165 at 255, 165 * (5/255)^1.2 = 1.4 at the cold bound.
    assert (alpha_hw[hot] == 165).all() and alpha_hw[~hot].max() <= 2
    assert "superpixel" in p.inner_text("#info") or "segment" in p.inner_text("#info")
    page.screenshot(tmp_path / f"browser_hot_segment_{case.layer}.png")
    page.close()


def test_all_tokens_draw_the_patches_and_skip_the_class_token():
    """``tokens=all``: rows per image = 1 class token + a 3 x 3 grid; the heatmap values are
    the patch rows' codes in grid order, never the class token's."""
    tokens_per_image = 10
    manifest = {"spec": {"tokens": "all"}, "token_index": list(range(10)),
                "tokens_per_image": tokens_per_image}  # fmt: skip
    cache = SimpleNamespace(
        manifest=manifest, read=lambda rows: torch.as_tensor(rows)[:, None].float()
    )
    identity = lambda x: SimpleNamespace(codes=x)  # noqa: E731 - the row number as the code
    assert all_tokens_grid(cache) == ((3, 3), 1)
    heat_args, note = heat_sources(identity, cache, np.arange(4), CPU)
    assert heat_args["grid_hw"] == (3, 3) and "not drawn" in note
    values = heat_args["patch_maps"](np.array([2, 0]), np.array([0, 1]), np.array([0, 0]))
    assert values.tolist() == [list(range(21, 30)), list(range(1, 10))]  # rows 20 and 0: CLS
    cnn = {**manifest, "token_index": list(range(9)), "tokens_per_image": 9}  # no prefix
    assert all_tokens_grid(SimpleNamespace(manifest=cnn)) == ((3, 3), 0)
    assert heat_sources(identity, SimpleNamespace(manifest=cnn), np.arange(4), CPU)[1] == (
        "the latent on each patch"
    )
    no_grid = {**manifest, "token_index": list(range(7)), "tokens_per_image": 7}
    assert all_tokens_grid(SimpleNamespace(manifest=no_grid)) is None  # 7 = 4 + 3 prefix: no
    _, note = heat_sources(identity, SimpleNamespace(manifest=no_grid), np.arange(4), CPU)
    assert note.startswith("none")


@pytest.fixture(scope="module")
def segment_run(tmp_path_factory, compose):
    """A tiny random-init CAST's superpixel tokens, a TopK SAE trained for one epoch on
    them, and ``evaluate_with_browser``'s run dir and W&B media."""
    from hsae.evaluation import step3
    from hsae.training.run import train

    tmp = tmp_path_factory.mktemp("browser-segment-run")
    cfg = compose([
        *TINY, "dataset.n_train=128", "dataset.n_val=96", "optim.epochs=1",
        "backbone=cast_s_moco", "backbone.model_name=cast_tiny+slic", "backbone.pretrained=null",
        "backbone.d_model=128", "backbone.layer=0", "backbone.tokens=segments",
        "sae=topk", "sae.expansion=2", "sae.k=4", f"cache.dir={tmp / 'cache'}",
    ])  # fmt: skip
    train(cfg, tmp / "run")
    media: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step3, "_log_eval_to_wandb", lambda *a: media.append(a[3]))
        evaluate_with_browser(tmp / "run", device="cpu", interp=False, control=False, names=False)
    return tmp / "run", media[0]


def test_segment_run_browser_shows_heatmaps(segment_run, chromium, tmp_path):  # noqa: F811
    run_dir, media = segment_run
    out = run_dir / "browser"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["heat_kind"] == "segments" and manifest["thumbs"] == "webp"
    meta = read_data(out / "data" / "index.js")["meta"]
    assert meta["info"]["tokens"] == "segments" and meta["segments"]["grid"] == [8, 8]
    assert "superpixel" in meta["info"]["heatmaps"]
    with Image.open(media["latents/top_images"]) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 20 and pixels.max() > 200

    page = Page(chromium, (out / "index.html").as_uri())
    p = page.page
    assert p.is_visible("#heat")  # the heatmaps box
    p.wait_for_selector("canvas.heat[data-painted='1']", timeout=10_000)
    # Heatmaps drawn over the first card's thumbnails: some cells opaque, not all.
    alpha = p.evaluate(
        "() => { const c = document.querySelector('canvas.heat[data-painted=\"1\"]');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let hot = 0; for (let i = 3; i < d.length; i += 4) hot += d[i] > 40; return hot; }"
    )
    assert 0 < alpha < 64
    page.screenshot(tmp_path / "browser_segment_run.png")
    page.close()
