"""The label tree that travels with every dataset and cache.

Levels run from coarse (index 0, children of the root) to fine (the last level, the leaves).
Every class at level ``l > 0`` has exactly one parent at level ``l - 1``; all leaves sit at
the same depth. Images carry one label per level (``labels_nl``), derived from their leaf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hsae.errors import HsaeError


@dataclass(frozen=True)
class Hierarchy:
    level_names: tuple[str, ...]
    """Names of the levels, coarse to fine, e.g. ``("family", "shape", "variant")``."""
    class_names: tuple[tuple[str, ...], ...]
    """``class_names[l][c]``: name of class ``c`` at level ``l``."""
    parents: tuple[tuple[int, ...], ...]
    """``parents[l][c]``: index of the parent (at level ``l - 1``) of class ``c`` at level ``l``;
    -1 (the root) at level 0."""

    def __post_init__(self) -> None:
        if not (len(self.level_names) == len(self.class_names) == len(self.parents)):
            raise HsaeError("hierarchy: level_names, class_names and parents differ in length")
        for level, (names, parents) in enumerate(zip(self.class_names, self.parents, strict=True)):
            if len(names) != len(parents):
                raise HsaeError(
                    f"hierarchy level {level}: {len(names)} names, {len(parents)} parents"
                )
            n_above = len(self.class_names[level - 1]) if level else 0
            for c, p in enumerate(parents):
                ok = p == -1 if level == 0 else 0 <= p < n_above
                if not ok:
                    raise HsaeError(
                        f"hierarchy level {level}: class {names[c]!r} has bad parent {p}"
                    )

    @property
    def n_levels(self) -> int:
        return len(self.level_names)

    def n_classes(self, level: int) -> int:
        return len(self.class_names[level])

    @property
    def n_leaves(self) -> int:
        return self.n_classes(self.n_levels - 1)

    def class_paths(self, level: int) -> np.ndarray:
        """``[n_classes(level), level + 1]``: each class's index at levels 0..level (its
        ancestors, then itself; root excluded). Negative ``level`` counts from the leaves."""
        if not -self.n_levels <= level < self.n_levels:
            raise HsaeError(f"level {level} out of range for a tree with {self.n_levels} levels")
        level %= self.n_levels
        paths = np.empty((self.n_classes(level), level + 1), dtype=np.int64)
        paths[:, level] = np.arange(self.n_classes(level))
        for m in range(level, 0, -1):
            paths[:, m - 1] = np.asarray(self.parents[m])[paths[:, m]]
        return paths

    def leaf_paths(self) -> np.ndarray:
        """``[n_leaves, n_levels]``: each leaf's class index at every level (root excluded)."""
        return self.class_paths(-1)

    def labels_from_leaves(self, leaves_n: np.ndarray) -> np.ndarray:
        """``[n, n_levels]`` labels at every level from leaf indices."""
        return self.leaf_paths()[np.asarray(leaves_n, dtype=np.int64)]

    def lca_depth(self, leaves_a: np.ndarray, leaves_b: np.ndarray) -> np.ndarray:
        """Depth of the lowest common ancestor: 0 = root, ``n_levels`` = same leaf."""
        paths = self.leaf_paths()
        return _shared_prefix(paths[np.asarray(leaves_a)], paths[np.asarray(leaves_b)])

    def class_distance(self, level: int) -> np.ndarray:
        """``[n_classes(level), n_classes(level)]``: tree distance (edges on the path through the lowest
        common ancestor) between the classes of ``level``; CPCC correlates features with it."""
        paths = self.class_paths(level)
        depth = _shared_prefix(paths[:, None, :], paths[None, :, :])
        return 2 * (paths.shape[1] - depth)

    def leaf_distance(self) -> np.ndarray:
        """``[n_leaves, n_leaves]`` tree distance (edges on the path) between leaves."""
        return self.class_distance(-1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level_names": list(self.level_names),
            "class_names": [list(n) for n in self.class_names],
            "parents": [list(p) for p in self.parents],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hierarchy:
        return cls(
            level_names=tuple(d["level_names"]),
            class_names=tuple(tuple(n) for n in d["class_names"]),
            parents=tuple(tuple(int(p) for p in ps) for ps in d["parents"]),
        )

    @classmethod
    def from_nested(cls, level_names: tuple[str, ...], tree: dict[str, Any]) -> Hierarchy:
        """Build from nested dicts/lists, e.g. ``{"round": {"circle": ["red", "blue"]}}``.

        Leaves given as a list of strings; names at the finest level are made unique by
        prefixing their parent's name when they repeat.
        """
        class_names: list[list[str]] = [[] for _ in level_names]
        parents: list[list[int]] = [[] for _ in level_names]

        def walk(node: Any, level: int, parent: int, parent_name: str) -> None:
            items = node.items() if isinstance(node, dict) else ((n, None) for n in node)
            for name, child in items:
                full = name if level < len(level_names) - 1 else f"{name} {parent_name}".strip()
                class_names[level].append(full)
                parents[level].append(parent)
                if child is not None:
                    walk(child, level + 1, len(class_names[level]) - 1, name)

        walk(tree, 0, -1, "")
        return cls(
            level_names=tuple(level_names),
            class_names=tuple(tuple(n) for n in class_names),
            parents=tuple(tuple(p) for p in parents),
        )


def _shared_prefix(paths_a: np.ndarray, paths_b: np.ndarray) -> np.ndarray:
    """Depth of the lowest common ancestor of two classes' paths (``class_paths`` rows): paths
    agree on a prefix of levels, and its length is that depth."""
    return np.cumprod(paths_a == paths_b, axis=-1).sum(axis=-1)
