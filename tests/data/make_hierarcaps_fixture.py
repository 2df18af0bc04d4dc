"""Rebuild tests/data/hierarcaps/ from the full HierarCaps test set (1,000 photos).

    python tests/data/make_hierarcaps_fixture.py /path/to/hierarcaps/images

The fixture is 32 of the 1,000 rows, in the CSV's order, chosen so the tests see what the
full set has: chains that share a coarse caption (3 birds, 2 bathrooms, 2 winter sports...),
captions that appear at different levels of different chains ("bird", "toilet", "skier",
"sport", "tennis", "table", "cake", "train", "oven"), the two grayscale ("L") JPEGs among
them, and the photo the preprocessing tests crop (COCO_val2014_000000000802.jpg). The
shipped photos are all 256x256; to exercise resizing and cropping on real JPEGs, some are
kept byte for byte and the others centre-cropped to another aspect ratio and downscaled
(``SIZES``), re-encoded at JPEG quality 85 in their own mode. The CSV rows are copied
verbatim.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from PIL import Image

ROWS = (
    0, 1, 2, 5, 8, 10, 17, 40, 41, 43, 44, 48, 51, 52, 72, 86,
    93, 105, 109, 119, 124, 156, 173, 174, 188, 194, 213, 225, 511, 522, 526, 532,
)  # fmt: skip
KEEP = {0, 1, 17, 173, 213}  # byte-for-byte originals (+ every other row of the rest)
SIZES = ((224, 160), (160, 224), (200, 150), (150, 200), (256, 144), (128, 128), (240, 180))
OUT = Path(__file__).resolve().parent / "hierarcaps"
CSV_NAME = "hierarcaps_test.csv"


def centre_crop_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = image.size
    target = size[0] / size[1]
    if w / h > target:  # too wide: crop the sides
        cw, ch = round(h * target), h
    else:
        cw, ch = w, round(w / target)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", type=Path, help="the full set's images/ (CSV beside it)")
    args = parser.parse_args()
    src_csv = args.images.parent / CSV_NAME
    with open(src_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    with open(OUT / CSV_NAME, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        resized = 0
        for i in ROWS:
            row = rows[i]
            writer.writerow(row)
            name = row["image_url"].rsplit("/", 1)[-1]
            src, dst = args.images / name, OUT / "images" / name
            if i in KEEP or ROWS.index(i) % 2 == 0:
                shutil.copyfile(src, dst)
                continue
            with Image.open(src) as image:
                centre_crop_resize(image, SIZES[resized % len(SIZES)]).save(dst, quality=85)
            resized += 1


if __name__ == "__main__":
    main()
