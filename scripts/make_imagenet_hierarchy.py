"""Write hsae/data/imagenet_hierarchy.json: the WordNet 3.0 hierarchy of ImageNet-1k, cut
to a fixed number of levels.

    apt-get install wordnet-base        # WordNet 3.0 database files in /usr/share/wordnet
    python scripts/make_imagenet_hierarchy.py [--wordnet-dir DIR] [--out FILE]

The 1,000 class synset ids come from timm (``timm/data/_info/imagenet_synsets.txt``, the
standard class order). The script reads WordNet's ``data.noun`` directly (the ImageNet id
``n01440764`` is ``n`` + the synset's offset in that file), so it needs no NLTK.

How the levels are chosen (the choice is fixed so that every cache and metric agrees):

1. Each class's path to ``entity`` follows its first hypernym in ``data.noun`` (WordNet is a
   DAG; e.g. dog -> canine, not -> domestic animal), instance hypernyms when it has none.
2. The union of the 1,000 paths is a tree; chains of single-child nodes are collapsed into
   their lowest node (the most specific name for the same set of classes).
3. Coarse levels are nested *cuts* of that tree. Starting from the root, the group that
   covers the most classes is split until the cut has at least ``LEVEL_SIZES[l]`` groups
   (ties broken by synset id): a node splits into its children, except that children with
   fewer than half the level's mean group size (1,000 / (2 * size) classes) are pooled into
   one group "other <node>" (e.g. "other artifact"), which a finer level splits into its
   members. Splitting the largest group first balances the groups by class count rather
   than by WordNet depth (5 to 18 between classes); pooling keeps one-class WordNet
   branches (bakery, teddy) from becoming top-level groups. A class reached before the
   finest cut stays its own group at the levels below. ImageNet stays lopsided all the
   same: "animal" alone holds 398 classes at the coarsest level.

Levels, coarse to fine: ``LEVEL_NAMES`` with 10, 40 and 166 groups, then the 1,000 classes.
The file stores, per level, the names, the parent of each group one level up, and ids:
synset ids, or ``<parent id>:other`` for pooled groups.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LEVEL_NAMES = ("coarse", "middle", "fine", "class")
LEVEL_SIZES = (10, 40, 160)  # groups per coarse level: ~4x finer each step, then 1,000 classes
ROOT = "n00001740"  # entity
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "hsae" / "data" / "imagenet_hierarchy.json"


def read_nouns(wordnet_dir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``(name of each noun synset, its hypernyms in file order)``, ids as ``n%08d``."""
    names: dict[str, str] = {}
    hypernyms: dict[str, list[str]] = {}
    with open(wordnet_dir / "data.noun", encoding="latin-1") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" | ")[0].split()
            wnid = "n" + fields[0]
            n_words = int(fields[3], 16)
            names[wnid] = fields[4].replace("_", " ")
            at = 4 + 2 * n_words
            n_pointers = int(fields[at])
            pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(n_pointers)]
            plain = ["n" + p[1] for p in pointers if p[0] == "@" and p[2] == "n"]
            instance = ["n" + p[1] for p in pointers if p[0] == "@i" and p[2] == "n"]
            hypernyms[wnid] = plain or instance
    return names, hypernyms


def imagenet_wnids() -> list[str]:
    import timm

    path = Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt"
    wnids = path.read_text().split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise SystemExit(f"{path} is not the sorted list of 1,000 ImageNet synsets")
    return wnids


def build_tree(leaves: list[str], hypernyms: dict[str, list[str]]) -> dict[str, list[str]]:
    """Children of every node on the leaves' first-hypernym paths, chains collapsed."""
    parent: dict[str, str] = {}
    for leaf in leaves:
        node = leaf
        while node != ROOT:
            if not hypernyms.get(node):
                raise SystemExit(f"{node} has no hypernym path to entity ({ROOT})")
            up = hypernyms[node][0]
            parent.setdefault(node, up)
            node = up
    children: dict[str, list[str]] = {}
    for node, up in parent.items():
        children.setdefault(up, []).append(node)
    leaf_set = set(leaves)
    for node in [n for n in children if n in leaf_set]:
        raise SystemExit(f"class {node} is an ancestor of other classes; cannot cut the tree")

    def collapse(node: str) -> str:
        while node not in leaf_set and len(children[node]) == 1:
            node = children[node][0]
        return node

    tree: dict[str, list[str]] = {}
    stack = [collapse(ROOT)]
    while stack:
        node = stack.pop()
        if node in leaf_set:
            continue
        kids = sorted(collapse(c) for c in children[node])
        tree[node] = kids
        stack.extend(kids)
    tree["__root__"] = [collapse(ROOT)]
    return tree


def leaves_under(tree: dict[str, list[str]], node: str) -> list[str]:
    if node not in tree:
        return [node]
    return [leaf for child in tree[node] for leaf in leaves_under(tree, child)]


class Group:
    """A node of the tree, or a pool of small sibling nodes ("other <parent>")."""

    def __init__(self, nodes: list[str], parent: str | None, tree: dict[str, list[str]]):
        self.nodes, self.parent = sorted(nodes), parent
        self.leaves = [leaf for node in self.nodes for leaf in leaves_under(tree, node)]

    @property
    def key(self) -> str:
        return self.nodes[0] if self.parent is None else f"{self.parent}:other"

    def name(self, names: dict[str, str]) -> str:
        return names[self.nodes[0]] if self.parent is None else f"other {names[self.parent]}"


def split(group: Group, tree: dict[str, list[str]], min_size: int) -> list[Group]:
    """A pool splits into its nodes; a node into its children, small children pooled."""
    if group.parent is not None:
        return [Group([node], None, tree) for node in group.nodes]
    (node,) = group.nodes
    children = [Group([c], None, tree) for c in tree[node]]
    small = [g for g in children if len(g.leaves) < min_size]
    if len(small) < 2:
        return children
    pool = Group([n for g in small for n in g.nodes], node, tree)
    return [g for g in children if len(g.leaves) >= min_size] + [pool]


def cuts(tree: dict[str, list[str]], sizes: tuple[int, ...], n_leaves: int) -> list[list[Group]]:
    """Nested cuts, each of at least ``sizes[l]`` groups, made by splitting the largest."""
    cut = [Group(tree["__root__"], None, tree)]
    out = []
    for size in sizes:
        # Children smaller than half the level's mean group size are pooled.
        min_size = n_leaves // (2 * size)
        while len(cut) < size:
            splittable = [g for g in cut if len(g.nodes) > 1 or g.nodes[0] in tree]
            if not splittable:
                break
            largest = max(splittable, key=lambda g: (len(g.leaves), g.key))
            cut.remove(largest)
            cut.extend(split(largest, tree, min_size))
        out.append(sorted(cut, key=lambda g: g.key))
    return out


def build(wordnet_dir: Path) -> dict:
    names, hypernyms = read_nouns(wordnet_dir)
    wnids = imagenet_wnids()
    missing = [w for w in wnids if w not in names]
    if missing:
        raise SystemExit(f"{wordnet_dir} is not WordNet 3.0: no synsets {missing[:3]}")
    tree = build_tree(wnids, hypernyms)
    levels = [*cuts(tree, LEVEL_SIZES, len(wnids)), [Group([w], None, tree) for w in wnids]]
    parents = [[-1] * len(levels[0])]
    for level in range(1, len(levels)):
        group_above = {leaf: i for i, g in enumerate(levels[level - 1]) for leaf in g.leaves}
        parents.append([group_above[g.leaves[0]] for g in levels[level]])
    class_names = []
    for cut in levels:
        plain = [g.name(names) for g in cut]
        class_names.append(
            [
                n if plain.count(n) == 1 else f"{n} ({g.key})"
                for n, g in zip(plain, cut, strict=True)
            ]
        )
    return {
        "source": "WordNet 3.0 noun hypernyms (first hypernym), ImageNet-1k synsets from timm; "
        "made by scripts/make_imagenet_hierarchy.py",
        "level_names": list(LEVEL_NAMES),
        "class_names": class_names,
        "parents": parents,
        "wnids": [[g.key for g in cut] for cut in levels],
    }


def write(data: dict, out: Path) -> None:
    # One list per line: small, and diffs show which level changed.
    lines = ["{"]
    items = list(data.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, list) and value and isinstance(value[0], list):
            inner = ",\n    ".join(json.dumps(v) for v in value)
            lines.append(f'  "{key}": [\n    {inner}\n  ]{comma}')
        else:
            lines.append(f'  "{key}": {json.dumps(value)}{comma}')
    lines.append("}")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if not (args.wordnet_dir / "data.noun").is_file():
        raise SystemExit(
            f"no WordNet data.noun in {args.wordnet_dir}: apt-get install wordnet-base, or "
            "pass --wordnet-dir to a WordNet 3.0 dict/ folder"
        )
    data = build(args.wordnet_dir)
    write(data, args.out)
    sizes = ", ".join(
        f"{n}: {len(c)}" for n, c in zip(data["level_names"], data["wnids"], strict=True)
    )
    print(f"wrote {args.out} ({sizes})")


if __name__ == "__main__":
    main()
