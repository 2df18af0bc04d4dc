"""The feature browser: static pages to look at what each SAE latent means.

``write_run_browser(run_dir)`` writes ``<run dir>/browser/`` (``evaluate.py run_dir=...``
does it by default through ``evaluate_with_browser``, after step 3; ``browser=false`` skips
it); ``write_comparison_browser({label: run
dir}, out_dir)`` writes one folder with each run's browser and a side-by-side page of their
latents for the same class. The pages are plain files (HTML, vanilla JS, CSS, JSON in
``<script>`` wrappers, WebP thumbnails): open ``index.html`` from disk or serve the folder
with any static server (``python -m http.server``). docs/browser.md describes them.
"""

from hsae.browser.compare import write_comparison_browser
from hsae.browser.run import evaluate_with_browser, write_run_browser
from hsae.browser.site import BrowserResult, SiteInputs, build_site
from hsae.browser.stats import LatentTable, containment, latent_table

__all__ = [
    "BrowserResult",
    "LatentTable",
    "SiteInputs",
    "build_site",
    "containment",
    "evaluate_with_browser",
    "latent_table",
    "write_comparison_browser",
    "write_run_browser",
]
