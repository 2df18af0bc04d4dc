"""The feature browser in a real headless browser: Debian's Chromium driven by Playwright,
the pages served by Python's http.server on localhost (and opened from disk). Never
skipped: without Chromium or Playwright the tests fail with the command that installs them
(``.ci/run`` does, as root)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from hsae.browser import write_comparison_browser
from hsae.browser.compare import read_data
from hsae.data.synthetic import HIERARCHY
from tests.test_browser import make_site

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
N_LATENTS = 40
PER_PAGE = 24  # app.js PER_PAGE.flat


@pytest.fixture(scope="module")
def chromium(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's package with "
            "`apt-get update && apt-get install -y chromium` (as .ci/run does)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install -e '.[dev]' (never `playwright install`)")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )  # fmt: skip
        yield context
        context.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``root/`` with two runs' browsers (``a``: an H-SAE, ``b``: a Matryoshka SAE) and a
    comparison folder of both."""
    root = tmp_path_factory.mktemp("site")
    hsae_run = {"kind": "hierarchical", "n_parents": 8, "n_children": 4}
    groups = {"kind": "matryoshka", "groups": [[0, 3], [3, 12], [12, 40]]}
    _, table = make_site(root / "a" / "browser", hsae_run, title="run a")
    make_site(root / "b" / "browser", groups, title="run b", seed=1)
    write_comparison_browser({"backbone A": root / "a", "backbone B": root / "b"}, root / "compare")
    return root, table


@pytest.fixture(scope="module")
def server(site):
    root, _ = site

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def handle(self):  # the page navigating away mid-transfer is no error
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                super().handle()

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class Page:
    """A page with every console error, page error and failed request recorded."""

    def __init__(self, context, url: str):
        self.page = context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"failed: {r.url}"))
        self.page.on(
            "response", lambda r: r.status >= 400 and self.errors.append(f"{r.status}: {r.url}")
        )
        self.page.goto(url)
        self.ready()

    def ready(self) -> None:
        self.page.wait_for_selector("body[data-ready='1']", timeout=15_000)
        self.page.wait_for_load_state("networkidle")

    def latents(self) -> list[int]:
        """Latent ids of the cards on screen, top to bottom (members included)."""
        return [int(x) for x in self.page.eval_on_selector_all(
            "article.latent", "els => els.map(e => e.dataset.latent)")]  # fmt: skip

    def search(self, text: str) -> list[int]:
        self.page.fill("#search", text)
        self.ready()
        return self.latents()

    def screenshot(self, path: Path) -> None:
        self.page.screenshot(path=str(path), full_page=False)
        keep = os.environ.get("HSAE_BROWSER_SCREENSHOTS")  # a folder to look at them
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(keep) / path.name)

    def close(self) -> None:
        assert not self.errors, self.errors
        self.page.close()


def loaded_images(page) -> tuple[int, int]:
    """(thumbnails on screen, of them decoded with a size)."""
    return page.evaluate(
        "() => { const i = [...document.querySelectorAll('.thumb img')];"
        " return [i.length, i.filter(x => x.complete && x.naturalWidth > 0).length]; }"
    )


def test_run_page_lists_searches_sorts_and_arranges(chromium, server, site, tmp_path):
    _, table = site
    page = Page(chromium, f"{server}/a/browser/index.html")
    p = page.page
    assert p.get_attribute("#count", "data-total") == str(N_LATENTS)
    assert p.get_attribute("#count", "data-match") == str(N_LATENTS)
    assert page.latents() == list(range(PER_PAGE))
    p.evaluate("window.scrollTo(0, 0)")
    p.wait_for_function(
        "() => [...document.querySelectorAll('.thumb img')].slice(0, 6)"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)  # fmt: skip
    assert p.locator("canvas.heat").count() == p.locator(".thumb img").count() > 0
    assert p.locator(".bar span").count() >= 3 * PER_PAGE  # a distribution per level
    page.screenshot(tmp_path / "browser_run_page.png")
    p.click("#next")
    page.ready()
    assert page.latents() == list(range(PER_PAGE, N_LATENTS))

    # Search: an id, then a class name (top class at any level, or the automatic name).
    assert page.search("#12") == [12]
    circle = page.search("circle")
    expected = sorted(
        k for k in range(N_LATENTS)
        if any("circle" in HIERARCHY.class_names[lv][c] for lv, c in enumerate(table.top_class_kl[k]) if c >= 0)
    )  # fmt: skip
    assert circle == expected and 3 < len(circle) < N_LATENTS
    assert page.search("no such class") == []
    assert "No latent matches" in p.inner_text("#list")
    page.search("")

    # Sort by density, largest first; then ascending.
    p.select_option("#sort", "density")
    page.ready()
    density = table.density_k
    shown = page.latents()
    assert shown == sorted(range(N_LATENTS), key=lambda k: (-density[k], k))[:PER_PAGE]
    p.click("#order")
    page.ready()
    assert [density[k] for k in page.latents()] == sorted(density)[:PER_PAGE]

    # By purest level: the shape level holds exactly the 9 shape detectors.
    p.click("button[data-view=level]")
    p.click("#chips button[data-sel='1']")
    page.ready()
    assert sorted(page.latents()) == list(range(3, 12))
    # H-SAE: each parent followed by its 4 children.
    p.click("button[data-view=structure]")
    page.ready()
    units = p.eval_on_selector_all(
        ".unit", "us => us.map(u => u.querySelectorAll('article').length)"
    )
    assert units == [5] * 8
    # Co-activation: family detectors contain their shapes, shapes their variants.
    p.click("button[data-view=contain]")
    page.ready()
    heads = p.eval_on_selector_all(".unit > article", "els => els.map(e => +e.dataset.latent)")
    # 3 families (3 shapes each), 9 shapes (3 variants each): 8 containers per page.
    assert heads == list(range(8)) and p.inner_text("#pageinfo") == "page 1 of 2"
    members = p.eval_on_selector_all(
        ".unit >> nth=0 >> .members article", "els => els.map(e => +e.dataset.latent)"
    )
    assert sorted(members) == [3 + s for s in range(9) if HIERARCHY.parents[1][s] == 0]
    page.screenshot(tmp_path / "browser_containment.png")
    # A latent's id link goes to that latent, whatever the view.
    p.click(".members article .lid >> nth=0")
    page.ready()
    assert len(page.latents()) == 1
    page.close()


def test_page_works_opened_from_disk(chromium, site):
    root, _ = site
    page = Page(chromium, (root / "b" / "browser" / "index.html").as_uri())
    p = page.page
    assert p.get_attribute("#count", "data-total") == str(N_LATENTS)
    p.wait_for_function(
        "() => [...document.querySelectorAll('.thumb img')].slice(0, 6)"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)  # fmt: skip
    p.click("button[data-view=structure]")  # Matryoshka groups: group 1 = latents 3..11
    p.click("#chips button[data-sel='1']")
    page.ready()
    assert sorted(page.latents()) == list(range(3, 12))
    page.close()


def test_side_by_side_page(chromium, server, site, tmp_path):
    root, _ = site
    page = Page(chromium, f"{server}/compare/index.html")
    p = page.page
    assert p.locator(".col").count() == 2
    p.select_option("#level", "1")
    p.fill("#class", "triangle")
    p.dispatch_event("#class", "change")
    page.ready()
    for label, run in (("backbone A", "a"), ("backbone B", "b")):
        cards = p.eval_on_selector_all(
            f".col[data-run='{label}'] article", "els => els.map(e => +e.dataset.latent)"
        )
        index = read_data(root / run / "browser" / "data" / "index.js")["cols"]
        triangle = HIERARCHY.class_names[1].index("triangle")
        assert cards and all(index["top@shape"][k] == triangle for k in cards)
        assert cards[0] == 3 + triangle  # the shape detector, purity 1
    rows = p.eval_on_selector_all("table.summary tr", "rs => rs.map(r => r.innerText)")
    assert len(rows) == 3
    p.wait_for_function(
        "() => [...document.querySelectorAll('.thumb img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=10_000,
    )
    page.screenshot(tmp_path / "browser_side_by_side.png")
    # The per-run links lead to working pages.
    p.click("#info a >> nth=1")
    page.ready()
    assert p.get_attribute("#count", "data-total") == str(N_LATENTS)
    assert np.all(np.asarray(loaded_images(p)) >= 0)
    page.close()
