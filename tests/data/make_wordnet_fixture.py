"""Rebuild tests/data/wordnet/data.noun: the WordNet 3.0 noun entries that
scripts/make_imagenet_hierarchy.py reads for ImageNet-1k.

    apt-get install wordnet-base      # or any WordNet 3.0 dict/ folder
    python tests/data/make_wordnet_fixture.py [/usr/share/wordnet]

The script follows each of the 1,000 classes' first hypernym up to ``entity``; the fixture
holds exactly the synsets on those paths, each line verbatim from WordNet's ``data.noun``
(in file order), after WordNet's licence header (the file's leading lines, kept as the
licence asks). The script cannot tell the fixture from the full file: it would stop with
"has no hypernym path" if a synset it needs were missing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "wordnet" / "data.noun"


def load_script():
    spec = importlib.util.spec_from_file_location(
        "make_imagenet_hierarchy", ROOT / "scripts" / "make_imagenet_hierarchy.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def main() -> None:
    wordnet_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/wordnet")
    script = load_script()
    _, hypernyms = script.read_nouns(wordnet_dir)
    needed: set[str] = set()
    for node in script.imagenet_wnids():
        needed.add(node)
        while node != script.ROOT:
            node = hypernyms[node][0]
            needed.add(node)
    with open(wordnet_dir / "data.noun", encoding="latin-1", newline="") as f:
        lines = [
            line for line in f if line.startswith("  ") or "n" + line.split(" ", 1)[0] in needed
        ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="latin-1", newline="") as f:
        f.writelines(lines)
    print(f"wrote {OUT}: {len(needed)} synsets")


if __name__ == "__main__":
    main()
