"""Step 1, intra-image: how well a backbone's segments form a part-whole hierarchy.

CAST's notion of hierarchy is inside each image: superpixels group into parts, parts into
objects. Given, per image, a list of partitions (``levels``: ``[H, W]`` segment ids,
finest first) this module measures

- ``part_whole/nesting``: how well each fine segment lies inside one coarse segment. For
  each pair of consecutive levels, the mean over fine segments of the largest fraction of
  a fine segment's pixels inside a single coarse segment; then the mean over pairs. 1 for
  a tree (CAST's argmax tree is one by construction); lower when levels cut across each
  other (e.g. clusters of a ViT's tokens computed independently per level). A random
  partition into ``c`` coarse segments gives about the largest share of one of ``c``
  equal parts, below 1, but small fine segments nest in big coarse ones largely by chance,
  so ``part_whole/nesting_adjusted`` subtracts the nesting of the fine level with mirror
  images of the coarse one (same sizes and shapes, unrelated): (observed - chance) /
  (1 - chance), 1 for a tree and about 0 for unrelated levels.
- ``part_whole/assignment_confidence`` (CAST): the mean weight of each token's argmax in
  its soft assignment to the next stage: 1 when every token belongs to one parent.

and, where the images' part and object masks are known (the ``synthetic_tree`` dataset's
``masks(i)``), agreement with them:

- ``part_whole/part_iou``: for each ground-truth region of the part map (background, body,
  each part) the best IoU of any segment; averaged over regions, at the level where that
  average is highest (``part_whole/part_level``);
- ``part_whole/object_iou``: the same for the object mask (object vs background), best
  over levels (``part_whole/object_level``);
- ``part_whole/part_boundary_recall``: the fraction of ground-truth part-boundary pixels
  within ``tolerance`` pixels of a segment boundary at the part level;
- ``part_whole/levels_ordered``: 1 when the level best matching objects is no finer than
  the one best matching parts (wholes above parts), else 0.

Scores with a chance level of 0, for a criterion that needs no second backbone (the
CAST-vs-ViT studies' precondition: a ViT has no segment tree to compare with):

- ``part_whole/part_iou_over_chance``, ``part_whole/object_iou_over_chance``: the image's
  score minus the score of another image's segment tree (the next image's) against this
  image's masks: what a tree with the same statistics that never looked at this image gets
  (objects sit near the centre, so chance is well above 0);
- ``part_whole/assignment_confidence_over_chance`` (CAST): the argmax weight minus
  1 / (number of centres it was assigned over), the weight of a uniform assignment.

Levels are compared with masks at the masks' resolution (levels are upsampled, nearest).
Higher is better for all of them. Every score is per image first, then the mean over
images (``per_image_scores`` keeps the per-image values for image half-samples).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np

from hsae.errors import HsaeError

log = logging.getLogger(__name__)


def upsample(level_hw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``size`` (pixel centres)."""
    h, w = level_hw.shape
    rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(int)
    return level_hw[np.ix_(rows, cols)]


def _contingency(a_hw: np.ndarray, b_hw: np.ndarray) -> np.ndarray:
    """``[n_a, n_b]`` pixel counts of each pair of segments (ids made consecutive)."""
    _, a = np.unique(a_hw, return_inverse=True)
    _, b = np.unique(b_hw, return_inverse=True)
    n_b = int(b.max()) + 1
    counts = np.bincount(a.ravel() * n_b + b.ravel(), minlength=(int(a.max()) + 1) * n_b)
    return counts.reshape(-1, n_b)


def nesting(fine_hw: np.ndarray, coarse_hw: np.ndarray) -> float:
    """Mean over fine segments of the largest fraction of its pixels in one coarse segment."""
    table = _contingency(fine_hw, coarse_hw)
    return float((table.max(axis=1) / table.sum(axis=1)).mean())


def nesting_by_chance(fine_hw: np.ndarray, coarse_hw: np.ndarray) -> float:
    """``nesting`` of the fine level with mirror images of the coarse one (left-right,
    up-down, both): partitions with the same segment sizes and shapes, unrelated to the
    fine level. Small fine segments lie mostly inside big coarse ones by chance alone."""
    flips = (coarse_hw[:, ::-1], coarse_hw[::-1], coarse_hw[::-1, ::-1])
    return float(np.mean([nesting(fine_hw, flipped) for flipped in flips]))


def adjusted_nesting(fine_hw: np.ndarray, coarse_hw: np.ndarray) -> float:
    """``nesting`` corrected for chance: (observed - chance) / (1 - chance); 1 for a tree,
    about 0 for unrelated levels (1 when chance alone already nests them fully)."""
    chance = nesting_by_chance(fine_hw, coarse_hw)
    if chance >= 1.0:
        return 1.0
    return (nesting(fine_hw, coarse_hw) - chance) / (1.0 - chance)


def tree_consistency(levels: Sequence[np.ndarray], adjusted: bool = False) -> float:
    """Mean ``nesting`` (or ``adjusted_nesting``) over consecutive levels."""
    if len(levels) < 2:
        raise HsaeError(f"nesting needs at least 2 levels, got {len(levels)}")
    score = adjusted_nesting if adjusted else nesting
    return float(np.mean([score(f, c) for f, c in itertools.pairwise(levels)]))


def best_match_iou(segments_hw: np.ndarray, truth_hw: np.ndarray) -> float:
    """Mean over ground-truth regions of the best IoU of any segment with it."""
    table = _contingency(truth_hw, segments_hw)  # [truth, segments]
    union = table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table
    return float((table / union).max(axis=1).mean())


def _boundaries(labels_hw: np.ndarray) -> np.ndarray:
    edge = np.zeros(labels_hw.shape, dtype=bool)
    edge[:-1] |= labels_hw[:-1] != labels_hw[1:]
    edge[:, :-1] |= labels_hw[:, :-1] != labels_hw[:, 1:]
    return edge


def boundary_recall(segments_hw: np.ndarray, truth_hw: np.ndarray, tolerance: int = 1) -> float:
    """Fraction of the truth's boundary pixels within ``tolerance`` pixels (Chebyshev) of
    a boundary of the segments (1.0 when the truth has no boundary)."""
    truth = _boundaries(truth_hw)
    if not truth.any():
        return 1.0
    near = _boundaries(segments_hw)
    grown = near.copy()
    for dy in range(-tolerance, tolerance + 1):
        for dx in range(-tolerance, tolerance + 1):
            grown |= np.roll(np.roll(near, dy, axis=0), dx, axis=1)
    return float(grown[truth].mean())


def image_scores(
    levels: Sequence[np.ndarray],
    object_mask: np.ndarray | None = None,
    part_id: np.ndarray | None = None,
    tolerance: int = 1,
) -> dict[str, float]:
    """Every score of one image (mask scores only with masks)."""
    scores = {
        "part_whole/nesting": tree_consistency(levels),
        "part_whole/nesting_adjusted": tree_consistency(levels, adjusted=True),
    }
    if part_id is None or object_mask is None:
        return scores
    size = part_id.shape
    up = [upsample(level, size) for level in levels]
    part = [best_match_iou(level, part_id) for level in up]
    obj = [best_match_iou(level, object_mask.astype(np.int64)) for level in up]
    part_level, object_level = int(np.argmax(part)), int(np.argmax(obj))
    scores |= {
        "part_whole/part_iou": part[part_level],
        "part_whole/object_iou": obj[object_level],
        "part_whole/part_level": float(part_level),
        "part_whole/object_level": float(object_level),
        "part_whole/levels_ordered": float(object_level >= part_level),
        "part_whole/part_boundary_recall": boundary_recall(up[part_level], part_id, tolerance),
    }
    return scores


# Every key step 1 reports (NaN with a reason where a backbone has no segment tree or the
# dataset no masks): tree scores, then scores against the masks.
TREE_KEYS = (
    "part_whole/nesting",
    "part_whole/nesting_adjusted",
    "part_whole/assignment_confidence",
    "part_whole/assignment_confidence_over_chance",
)
MASK_KEYS = (
    "part_whole/part_iou",
    "part_whole/object_iou",
    "part_whole/part_iou_over_chance",
    "part_whole/object_iou_over_chance",
    "part_whole/part_level",
    "part_whole/object_level",
    "part_whole/levels_ordered",
    "part_whole/part_boundary_recall",
)
PART_WHOLE_KEYS = TREE_KEYS + MASK_KEYS


def _best_iou_over_levels(levels: Sequence[np.ndarray], truth_hw: np.ndarray) -> float:
    return max(best_match_iou(upsample(level, truth_hw.shape), truth_hw) for level in levels)


def per_image_scores(
    levels_per_image: Sequence[Sequence[np.ndarray]],
    masks: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    confidence: Sequence[np.ndarray] | None = None,
    n_centres: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """``{key: [n_images]}``: ``image_scores`` of each image; with ``masks`` (one
    ``(object_mask, part_id)`` per image, at least 2 images) the over-chance IoUs; with
    ``confidence`` (per stage ``[n_images, s_k]`` argmax weights, 0 for padding) the
    assignment confidence, and with ``n_centres`` (per stage ``[n_images]``: the real
    centres each stage's tokens were assigned over) its excess over a uniform assignment."""
    n = len(levels_per_image)
    if masks is not None and len(masks) != n:
        raise HsaeError(f"{len(masks)} masks for {n} images")
    per_image = [
        image_scores(levels, *(masks[i] if masks is not None else (None, None)))
        for i, levels in enumerate(levels_per_image)
    ]
    out = {k: np.array([s[k] for s in per_image]) for k in per_image[0]}
    if masks is not None and n >= 2:
        # Chance: the next image's tree against this image's masks (same segment counts
        # and sizes, blind to this image's content).
        other = [levels_per_image[(i + 1) % n] for i in range(n)]
        part_chance = np.array([_best_iou_over_levels(other[i], masks[i][1]) for i in range(n)])
        object_chance = np.array(
            [_best_iou_over_levels(other[i], masks[i][0].astype(np.int64)) for i in range(n)]
        )
        out["part_whole/part_iou_over_chance"] = out["part_whole/part_iou"] - part_chance
        out["part_whole/object_iou_over_chance"] = out["part_whole/object_iou"] - object_chance
    if confidence is not None:
        weights = [np.asarray(c, dtype=np.float64).reshape(n, -1) for c in confidence]
        real = [w > 0 for w in weights]
        n_real = sum(r.sum(1) for r in real)
        out["part_whole/assignment_confidence"] = sum(w.sum(1) for w in weights) / n_real
        if n_centres is not None:
            uniform = sum(
                r.sum(1) / np.maximum(np.asarray(c, dtype=np.float64), 1)
                for r, c in zip(real, n_centres, strict=True)
            )
            out["part_whole/assignment_confidence_over_chance"] = (
                out["part_whole/assignment_confidence"] - uniform / n_real
            )
    return out


def part_whole_scores(
    levels_per_image: Sequence[Sequence[np.ndarray]],
    masks: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    confidence: Sequence[np.ndarray] | None = None,
    n_centres: Sequence[np.ndarray] | None = None,
) -> dict[str, float]:
    """Means over images of ``per_image_scores``."""
    scores = per_image_scores(levels_per_image, masks, confidence, n_centres)
    return {k: float(np.mean(v)) for k, v in scores.items()}


def tree_levels(segments_hw: np.ndarray, parents: Sequence[np.ndarray]) -> list[np.ndarray]:
    """An image's partitions, finest first: its superpixels (``segments_hw``), then each
    stage's clusters (``parents[k]``: the stage-k+1 token of each stage-k token)."""
    level = np.asarray(segments_hw, dtype=np.int64)
    levels = [level]
    for parent in parents:
        level = np.asarray(parent, dtype=np.int64)[level]
        levels.append(level)
    return levels


def output_trees(out) -> tuple[list[list[np.ndarray]], list[np.ndarray], list[np.ndarray]]:
    """From a CAST forward pass (``CastOutput``): each image's levels, the argmax weights
    per stage ``[b, s_k]`` (0 for padding) and the real centres per stage ``[b]`` (the
    next stage's non-padded tokens; the last stage's clusters)."""
    from hsae.backbones.cast import segment_trees

    trees = segment_trees(out)
    segments = trees.segments_bhw.cpu().numpy()
    parents = [p.cpu().numpy() for p in trees.parents]
    levels = [tree_levels(segments[i], [p[i] for p in parents]) for i in range(len(segments))]
    confidence = [c.float().cpu().numpy() for c in trees.confidence]
    n_centres = [(~pad).sum(1).cpu().numpy() for pad in out.padding[1:]]
    last = out.assignments[-1]
    n_centres.append(np.full(last.shape[0], last.shape[-1]))
    return levels, confidence, n_centres


def cache_scores(cache, dataset=None, max_images: int | None = None) -> dict[str, float]:
    """Scores of the segment trees in a ``tokens=segments`` cache (CAST); with a dataset
    that has ``masks(i)`` (``synthetic_tree``), agreement with its parts and objects too."""
    trees = cache.segment_trees()
    ids = trees.image_ids if max_images is None else trees.image_ids[:max_images]
    levels = [trees.levels(int(i)) for i in ids]
    masks = [dataset.masks(int(i)) for i in ids] if hasattr(dataset, "masks") else None
    rows = np.searchsorted(trees.image_ids, ids) if max_images is not None else slice(None)
    confidence = [c[rows] for c in trees.confidence]
    return part_whole_scores(levels, masks, confidence)


def cluster_levels(
    tokens_nd: np.ndarray, grid: tuple[int, int], sizes: Sequence[int], seed: int = 0
) -> list[np.ndarray]:
    """Partitions of a flat backbone's patch grid (``tokens_nd``: one row per patch, row
    major), one k-means per level, each computed on its own: whether they nest is what
    ``nesting`` then measures. Finest first: the patches themselves, then ``sizes``."""
    from sklearn.cluster import KMeans

    n = grid[0] * grid[1]
    if len(tokens_nd) != n:
        raise HsaeError(f"{len(tokens_nd)} tokens for a {grid[0]} x {grid[1]} grid")
    levels = [np.arange(n).reshape(grid)]
    for k in sizes:
        labels = KMeans(n_clusters=min(k, n), n_init=1, random_state=seed).fit_predict(tokens_nd)
        levels.append(labels.reshape(grid))
    return levels
