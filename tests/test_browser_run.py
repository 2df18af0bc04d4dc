"""The browser of a real run: a tiny Matryoshka SAE trained on patch tokens of the tiny ViT,
evaluated with ``evaluate_with_browser`` (step 3, then the pages: heatmaps over the
synthetic shapes), then opened in Chromium; ``evaluate.py`` writes it by default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hsae.browser import evaluate_with_browser
from hsae.browser.compare import read_data
from tests.conftest import TINY
from tests.test_browser_page import Page, chromium  # noqa: F401 - the Chromium fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory, compose):
    """The run dir, and the media step 3 and the browser hand to the eval W&B run."""
    from hsae.evaluation import step3 as evaluation
    from hsae.training.run import train

    tmp = tmp_path_factory.mktemp("browser-run")
    cfg = compose([
        *TINY, "dataset.n_train=128", "dataset.n_val=96", "optim.epochs=1", "backbone.tokens=patch",
        "sae=matryoshka", "sae.expansion=2", "sae.k=4", f"cache.dir={tmp / 'cache'}",
    ])  # fmt: skip
    train(cfg, tmp / "run")
    media: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "_log_eval_to_wandb", lambda *a: media.append(a[3]))
        evaluate_with_browser(tmp / "run", device="cpu", interp=False, control=False,
                              names=False)  # fmt: skip
    return tmp / "run", media[0]


def test_evaluate_writes_the_browser_with_heatmaps(patch_run, chromium, tmp_path):  # noqa: F811
    patch_run, media = patch_run
    out = patch_run / "browser"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["heatmaps"] and manifest["thumbs"] == "webp"
    meta = read_data(out / "data" / "index.js")["meta"]
    cache = json.loads((patch_run / "cfg.json").read_text())["cache"]["val"]
    n_patches = len(json.loads((Path(cache) / "manifest.json").read_text())["token_index"])
    assert meta["grid"][0] * meta["grid"][1] == n_patches
    assert meta["structure"]["kind"] == "matryoshka" and meta["n_images"] == 96
    assert meta["info"]["tokens"] == "patch" and meta["info"]["arch"] == "matryoshka"
    # The same images go to the eval W&B run: a uint8 picture (not black) and a table.
    assert media["latents/top_images"] == out / "wandb_top_images.png"
    with Image.open(out / "wandb_top_images.png") as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.std() > 20 and pixels.max() > 200
    table = media["latents/browser"]
    assert table["columns"][0] == "latent" and len(table["rows"]) > 0

    page = Page(chromium, (out / "index.html").as_uri())
    p = page.page
    assert p.get_attribute("#count", "data-total") == str(meta["n_latents"])
    p.select_option("#sort", "density")
    page.ready()
    p.wait_for_function(
        "() => [...document.querySelectorAll('.thumb img')].slice(0, 4)"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)  # fmt: skip
    # Heatmaps drawn over the thumbnails: canvases with some non-transparent cells.
    alpha = p.evaluate(
        "() => { const c = document.querySelector('canvas.heat');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"
    )
    assert alpha > 0
    page.screenshot(tmp_path / "browser_patch_run.png")
    page.close()


def test_evaluate_py_writes_the_browser_by_default(compose):
    cfg = compose(["run_dir=somewhere"], config_name="evaluate")
    assert cfg.browser is True
