"""HierarCaps files (Alper & Averbuch-Elor, ECCV 2024): the CSV of caption chains and the
images it names, read from local folders only (nothing is downloaded).

A HierarCaps CSV has one row per image: ``captions`` is a chain of captions from general to
specific joined by ``" => "`` (four in the released data), ``image_url`` ends with the image's
file name. ``load_hierarcaps`` is the one parser: the dataset (``dataset=hierarcaps``, label =
the coarsest caption) and the step-1 joint-space metrics (``hsae.metrics.hierarcaps``) read
the CSV through it.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from hsae.errors import HsaeError

log = logging.getLogger(__name__)


SEPARATOR = " => "


@dataclass(frozen=True)
class HierarCaps:
    """Caption chains and their images, loaded from local files."""

    ids: list[str]
    """The ``id`` column, one per chain (= per image)."""
    chains: list[tuple[str, ...]]
    """``chains[i][j]``: caption ``j`` (0 = most general) of image ``i``."""
    image_paths: list[Path]
    """Local path of each chain's image."""
    captions: list[str]
    """Distinct caption strings over all chains, in first-seen order."""
    caption_ids_cl: np.ndarray
    """``[n_chains, n_levels]``: index into ``captions`` of each chain's captions."""

    @property
    def n_levels(self) -> int:
        return self.caption_ids_cl.shape[1]

    def __len__(self) -> int:
        return len(self.chains)


def load_hierarcaps(
    csv_path: str | Path, image_dir: str | Path | None = None, check_images: bool = True
) -> HierarCaps:
    """Read a HierarCaps CSV (``id, captions, image_url``); images are looked up as
    ``image_dir / <last path part of image_url>`` (``image_dir`` defaults to ``images/``
    beside the CSV). Every chain must have the same number of captions."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise HsaeError(
            f"no HierarCaps CSV at {csv_path}; pass the path of hierarcaps_test.csv "
            "(see shared/data/README.md)"
        )
    image_dir = (
        Path(image_dir).expanduser() if image_dir is not None else csv_path.parent / "images"
    )
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing_cols = {"captions", "image_url"} - set(reader.fieldnames or ())
        if missing_cols:
            raise HsaeError(
                f"{csv_path} lacks column(s) {sorted(missing_cols)}; a HierarCaps CSV has "
                f"columns id, captions, image_url (got {reader.fieldnames})"
            )
        rows = list(reader)
    if not rows:
        raise HsaeError(f"{csv_path} has no rows")
    ids: list[str] = []
    chains: list[tuple[str, ...]] = []
    paths: list[Path] = []
    for line, row in enumerate(rows, start=2):
        chain = tuple(c.strip() for c in row["captions"].split(SEPARATOR))
        if any(not c for c in chain) or len(chain) < 2:
            raise HsaeError(
                f"{csv_path} line {line}: captions {row['captions']!r} is not a chain of "
                f"non-empty captions joined by {SEPARATOR!r}"
            )
        if chains and len(chain) != len(chains[0]):
            raise HsaeError(
                f"{csv_path} line {line}: {len(chain)} captions, earlier rows have "
                f"{len(chains[0])}; every chain must have the same depth"
            )
        name = Path(urlparse(row["image_url"]).path).name
        if not name:
            raise HsaeError(
                f"{csv_path} line {line}: no file name in image_url {row['image_url']!r}"
            )
        ids.append(row.get("id", str(line - 2)))
        chains.append(chain)
        paths.append(image_dir / name)
    if check_images:
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise HsaeError(
                f"{len(absent)} of {len(paths)} HierarCaps images are missing under {image_dir} "
                f"(first: {absent[0].name}); put the images there, pass image_dir=, or "
                "check_images=False to load captions only"
            )
    index: dict[str, int] = {}
    caption_ids = np.array(
        [[index.setdefault(c, len(index)) for c in chain] for chain in chains], dtype=np.int64
    )
    log.info("loaded %d HierarCaps chains (%d distinct captions)", len(chains), len(index))
    return HierarCaps(ids, chains, paths, list(index), caption_ids)
