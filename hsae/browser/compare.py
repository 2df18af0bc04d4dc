"""One folder for several runs: each run's browser, and a side-by-side page of their latents
for the same class (the study calls this with one run per backbone)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsae.browser.run import BROWSER_DIR, write_run_browser
from hsae.browser.site import FORMAT, MANIFEST, copy_app
from hsae.errors import HsaeError
from hsae.rundir import write_atomic

log = logging.getLogger(__name__)


def read_data(path: Path) -> Any:
    """A browser data file (``hsaeData(<json>);``) as the JSON inside."""
    text = path.read_text()
    return json.loads(text[text.index("(") + 1 : text.rindex(")")])


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)[:80] or "run"


def _current(browser_dir: Path) -> bool:
    manifest = browser_dir / MANIFEST
    return manifest.exists() and json.loads(manifest.read_text()).get("format") == FORMAT


def write_comparison_browser(
    run_dirs_by_backbone: Mapping[str, str | Path], out_dir: str | Path, **browser_kwargs: Any
) -> Path:
    """Write ``out_dir/index.html``, a side-by-side view of several runs' latents for the
    same class, with each run's own browser in ``out_dir/<label>/`` (linked from it).

    ``run_dirs_by_backbone``: ``{label: run dir}`` in display order, e.g. ``{"clip":
    runs/a, "reclip": runs/b}``; labels become folder names (characters other than
    letters, digits, ``.``, ``_``, ``-`` turn into ``_``). A run whose ``<run dir>/browser``
    is current (``evaluate.py`` wrote it) is copied, so the folder stands alone; any other
    is built here (``write_run_browser``, which runs the SAE over the run's cached split;
    ``browser_kwargs`` go to it). The runs must share class names (the same dataset's
    label tree) for the side-by-side view. Returns the path of ``index.html``."""
    if len(run_dirs_by_backbone) < 1:
        raise HsaeError("write_comparison_browser needs at least one run: {label: run dir}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, slugs = [], set()
    for label, run_dir in run_dirs_by_backbone.items():
        slug = _slug(str(label))
        if slug in slugs:
            raise HsaeError(f"two runs map to the folder {slug!r}; give them distinct labels")
        slugs.add(slug)
        run_dir, target = Path(run_dir).resolve(), out_dir / slug
        source = run_dir / BROWSER_DIR
        if _current(source):
            tmp = target.with_name(f".{slug}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        else:
            log.info("no current browser in %s; building it into %s", run_dir, target)
            write_run_browser(run_dir, out_dir=target, **browser_kwargs)
        meta = read_data(target / "data" / "index.js")["meta"]
        runs.append({"label": str(label), "dir": slug, "title": meta["title"],
                     "n_latents": meta["n_latents"], "info": meta["info"]})  # fmt: skip
        runs[-1]["_classes"] = meta["classes"]
    shared = [set.intersection(*(set(r["_classes"][lv]) for r in runs if lv < len(r["_classes"])))
              for lv in range(min(len(r["_classes"]) for r in runs))]  # fmt: skip
    if not any(shared):
        raise HsaeError(
            f"runs {[r['label'] for r in runs]} share no class name at any level; the "
            "side-by-side view compares latents of the same class (evaluate them on one dataset)"
        )
    for r in runs:
        del r["_classes"]
    (out_dir / "data").mkdir(exist_ok=True)
    copy_app(out_dir)
    payload = {"compare": {"runs": runs}}
    write_atomic(out_dir / "data" / "index.js", "hsaeData(" + json.dumps(payload) + ");\n")
    log.info("comparison browser of %d runs: %s", len(runs), out_dir / "index.html")
    return out_dir / "index.html"
