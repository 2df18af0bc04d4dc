"""Procedural objects built of parts, whose class tree is visible in the pixels.

``dataset=synthetic_tree`` (version 2 of the synthetic data; ``synthetic`` stays for speed
tests). Each image shows one object: a **body** with **parts** attached around it.

- family (3): the body's shape (disc, square, triangle): the largest visible trait;
- genus (9): the part type (knob, spike, fin), three per family;
- species (27): the number of parts (1, 2 or 3, evenly spaced around the body).

So siblings look alike (same body, same parts, one part more or fewer), and branches differ
by larger traits. Everything else is **nuisance, drawn independently of the class and
shared across the whole tree**: body and part colours (random hues), position, scale,
rotation, background gradient and pixel noise. In version 1 the finest level was the colour,
shared by every branch, so learned features clustered by colour against the tree (issue
#13); here no level is a nuisance factor.

Each image's part-whole ground truth comes with it: ``masks(i)`` returns the object mask and
a part-id map (0 background, 1 body, 2.. the parts in angular order), for part-whole
(intra-image) hierarchy metrics. Parameters are drawn from ``numpy.random.default_rng([seed,
split, 2])`` at construction and every image is rendered on demand from its row, so the data
is deterministic by seed and costs no disk.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy

SPLITS = {"train": 0, "val": 1, "test": 2}
VERSION = 2

BODIES = ("disc", "square", "triangle")
PARTS = ("knob", "spike", "fin")
_ADJECTIVE = {"knob": "knobbed", "spike": "spiked", "fin": "finned"}
COUNTS = (1, 2, 3)
HIERARCHY = Hierarchy.from_nested(
    ("family", "genus", "species"),
    {
        body: {f"{_ADJECTIVE[part]} {body}": [f"x{n}" for n in COUNTS] for part in PARTS}
        for body in BODIES
    },
)
# Leaf index -> (body, part, count) indices; from_nested walks the tree in this order.
_LEAF_TRAITS = np.array(
    [(b, p, c) for b in range(len(BODIES)) for p in range(len(PARTS)) for c in range(len(COUNTS))]
)
_N_SIDES = {"disc": 0, "square": 4, "triangle": 3}
# Nuisance ranges (fractions of the image side). Objects fill about half the image so that
# parts stay a few pixels wide at 32 px (bodies of radius 0.17-0.23 and parts of independent
# hue: flat stand-ins reached 0.84 leaf accuracy in the budget, 0.95 with these).
SCALE_RANGE = (0.2, 0.26)  # body circumradius
CENTER_JITTER = 0.06  # centre offset from the image centre, per axis
# Parts take the complementary hue of their (random) body, so they always stand out from it.
PART_HUE_OFFSET: float | None = 0.5  # None: a hue of their own


def _body_radius(body: str, theta: np.ndarray) -> np.ndarray:
    """Distance from the centre to the body's outline along angle ``theta`` (body frame,
    circumradius 1): the disc's is 1, a regular polygon's shrinks towards its edges."""
    n = _N_SIDES[body]
    if n == 0:
        return np.ones_like(theta)
    sector = 2 * np.pi / n
    return np.cos(np.pi / n) / np.cos(np.mod(theta, sector) - sector / 2)


# A part in its own frame: u along the outward normal from its attachment point on the
# outline, v across it, both in units of the body's circumradius.
_PART_MASKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "knob": lambda u, v: (u - 0.32) ** 2 + v**2 < 0.34**2,  # a round bead on the outline
    "spike": lambda u, v: (u > -0.1) & (u < 0.95) & (np.abs(v) < 0.16 * (1.1 - u)),  # thin, long
    "fin": lambda u, v: (u > -0.1) & (u < 0.42) & (np.abs(v) < 0.5),  # short, wide plate
}


@lru_cache(maxsize=4)
def _grid(size: int, centres: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(ys, xs)`` ``[S, S]`` in [0, 1]: pixel centres (the object's geometry) or corners
    to corners (the background's gradient)."""
    coords = (np.arange(size) + 0.5) / size if centres else np.linspace(0, 1, size)
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    return ys, xs


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float64)


class SyntheticTree(Dataset):
    """``(image [3, S, S] float in [0, 1], index)`` pairs; labels in ``labels_nl``."""

    hierarchy = HIERARCHY

    def __init__(self, n_images: int, image_size: int = 32, seed: int = 0, split: str = "train"):
        if split not in SPLITS:
            raise HsaeError(
                f"synthetic_tree dataset: unknown split {split!r}; valid: {sorted(SPLITS)}"
            )
        if n_images < 1 or image_size < 16:
            raise HsaeError(
                f"synthetic_tree dataset: need n_images >= 1 and image_size >= 16 (parts are "
                f"a few pixels wide), got {n_images} and {image_size}"
            )
        self.n_images, self.image_size, self.seed, self.split = n_images, image_size, seed, split
        self.transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        # The trailing 2 keeps these draws apart from version 1's for the same seed.
        rng = np.random.default_rng([seed, SPLITS[split], VERSION])
        n = n_images
        self.leaves_n = rng.integers(0, HIERARCHY.n_leaves, size=n)
        self.labels_nl = HIERARCHY.labels_from_leaves(self.leaves_n)
        # Nuisance factors, independent of the class.
        self.scale_n = rng.uniform(*SCALE_RANGE, size=n)  # body circumradius / image side
        self.center_n2 = rng.uniform(0.5 - CENTER_JITTER, 0.5 + CENTER_JITTER, size=(n, 2))
        self.angle_n = rng.uniform(0, 2 * np.pi, size=n)
        self.body_hsv_n3 = np.column_stack(
            [rng.uniform(0, 1, n), rng.uniform(0.45, 1.0, n), rng.uniform(0.7, 1.0, n)]
        )
        self.part_hsv_n3 = np.column_stack(
            [rng.uniform(0, 1, n), rng.uniform(0.45, 1.0, n), rng.uniform(0.7, 1.0, n)]
        )
        if PART_HUE_OFFSET is not None:
            self.part_hsv_n3[:, 0] = np.mod(self.body_hsv_n3[:, 0] + PART_HUE_OFFSET, 1.0)
        # Dark background (objects are bright): level, tint, gradient direction and strength.
        self.background_n6 = rng.uniform(0.0, 1.0, size=(n, 6))
        self.noise_seed_n = rng.integers(0, 2**31, size=n)

    def __len__(self) -> int:
        return self.n_images

    def describe(self) -> dict:
        """Everything that determines the images (goes into cache keys)."""
        return {
            "name": "synthetic_tree",
            "n_images": self.n_images,
            "image_size": self.image_size,
            "seed": self.seed,
            "split": self.split,
            "version": VERSION,
        }

    def image_name(self, i: int) -> str:
        return f"synthetic_tree/{self.split}/{i}"

    def traits(self, i: int) -> tuple[str, str, int]:
        """(body, part type, number of parts) of image ``i``."""
        b, p, c = _LEAF_TRAITS[self.leaves_n[i]]
        return BODIES[b], PARTS[p], COUNTS[c]

    def masks(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(object_mask [S, S] bool, part_id [S, S] int)``: 0 background, 1 body, 2.. parts."""
        part_id = self._part_ids(np.array([i]))[0]
        return part_id > 0, part_id

    def render(self, i: int) -> torch.Tensor:
        rows = np.array([i])
        return torch.from_numpy(self._render(rows, self._part_ids(rows))[0])

    def render_all(self, indices: np.ndarray | None = None, chunk: int = 512) -> torch.Tensor:
        """``[n, 3, S, S]`` float images (no transform), equal to ``render`` one by one but
        about 10x faster: e.g. to hold a training set in memory."""
        rows = np.arange(self.n_images) if indices is None else np.asarray(indices)
        out = np.empty((len(rows), 3, self.image_size, self.image_size), dtype=np.float32)
        for k in range(0, len(rows), chunk):
            part = rows[k : k + chunk]
            out[k : k + chunk] = self._render(part, self._part_ids(part))
        return torch.from_numpy(out)

    # Both steps work on a batch of rows (a single image is a batch of one), by leaf class:
    # every image of a class has the same body, part type and count.

    def _part_ids(self, rows: np.ndarray) -> np.ndarray:
        s = self.image_size
        ys, xs = _grid(s, centres=True)
        scale = self.scale_n[rows, None, None]
        dx = (xs - self.center_n2[rows, 0, None, None]) / scale
        dy = (ys - self.center_n2[rows, 1, None, None]) / scale
        angle_n11 = self.angle_n[rows, None, None]
        theta = np.mod(np.arctan2(dy, dx) - angle_n11, 2 * np.pi)  # body frame
        r = np.hypot(dx, dy)
        part_id = np.zeros((len(rows), s, s), dtype=np.int64)
        leaves = self.leaves_n[rows]
        for leaf in np.unique(leaves):
            sel = leaves == leaf
            b, p, c = _LEAF_TRAITS[leaf]
            body, part, count = BODIES[b], PARTS[p], COUNTS[c]
            pid = np.where(r[sel] < _body_radius(body, theta[sel]), 1, 0)
            # Parts evenly spaced around the body, starting at a polygon's edge centre so
            # that they sit flat on the outline.
            offset = np.pi / _N_SIDES[body] if _N_SIDES[body] else 0.0
            for j in range(count):
                phi = offset + 2 * np.pi * j / count
                base = float(_body_radius(body, np.array([phi]))[0])
                # Outward normal at the attachment point: radial for the disc and the
                # polygons' edge centres alike.
                nx, ny = np.cos(phi + angle_n11[sel]), np.sin(phi + angle_n11[sel])
                ax, ay = base * nx, base * ny
                u = (dx[sel] - ax) * nx + (dy[sel] - ay) * ny
                v = -(dx[sel] - ax) * ny + (dy[sel] - ay) * nx
                pid = np.where(_PART_MASKS[part](u, v) & (pid == 0), 2 + j, pid)
            part_id[sel] = pid
        return part_id

    def _render(self, rows: np.ndarray, part_id: np.ndarray) -> np.ndarray:
        s = self.image_size
        ys, xs = _grid(s, centres=False)
        bg = self.background_n6[rows, :, None, None]
        direction = 2 * np.pi * bg[:, 3]
        ramp = (np.cos(direction) * (xs - 0.5) + np.sin(direction) * (ys - 0.5)) * 0.25 * bg[:, 4]
        level = 0.05 + 0.3 * bg[:, 0] + ramp
        tint = 1 + 0.3 * (bg[:, [1, 2, 5]] - 0.5)
        image = level[:, None] * tint
        body_rgb = np.array([_hsv(*hsv) for hsv in self.body_hsv_n3[rows]])[:, :, None, None]
        part_rgb = np.array([_hsv(*hsv) for hsv in self.part_hsv_n3[rows]])[:, :, None, None]
        image = np.where((part_id == 1)[:, None], body_rgb, image)
        image = np.where((part_id >= 2)[:, None], part_rgb, image)
        noise = np.stack(
            [
                np.random.default_rng(seed).normal(0, 0.03, size=(3, s, s))
                for seed in self.noise_seed_n[rows]
            ]
        )
        return np.clip(image + noise, 0, 1).astype(np.float32)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.render(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, i
