"""The import graph flows one way (README "Layout"): backbones and data -> cache -> sae ->
training | metrics -> evaluation, compare -> browser -> study -> cli, with the modules
"beside" (errors, config, tracking, the run dir, the label tree, CPCC, fingerprints) usable
by every stage and importing none. Every import counts, function-level ones included: a
lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# The first name under hsae/ (a module or a package) -> its stage. A stage may import
# earlier stages and the modules beside; never a later stage or a sibling of its own stage
# (training and metrics are independent: the trainer logs the SAE's own metrics from
# hsae.sae.metrics, and the step-1/step-3 metrics never need a trainer).
BESIDE = -1
STAGES = {
    "hsae": BESIDE,  # hsae/__init__.py
    "errors": BESIDE,
    "config": BESIDE,
    "tracking": BESIDE,
    "rundir": BESIDE,
    "label_tree": BESIDE,
    "cpcc": BESIDE,
    "fingerprint": BESIDE,
    "backbones": 0,
    "data": 0,
    "cache": 1,
    "sae": 2,
    "training": 3,
    "metrics": 3,
    "evaluation": 4,
    "compare": 4,
    "browser": 5,
    "study": 6,
    "cli": 7,
}
# Same-stage arrows that are part of the design: stand-ins train on synthetic_tree images.
SAME_STAGE_OK = {("backbones", "data")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every hsae import in the file, at any depth of the syntax tree."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from hsae import metrics` imports a stage as surely as `import hsae.metrics`.
            if name == "hsae":
                found += [(node.lineno, f"hsae.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] == "hsae"]


def layering_violations(root: Path) -> list[str]:
    """One line per import against the flow in ``root/hsae``, naming file, line and import."""
    problems = []
    for path in sorted((root / "hsae").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        source = _unit(_module_name(path, root))
        for line, target_module in _imports(path, root):
            target = _unit(target_module)
            if target == source:
                continue
            unknown = [unit for unit in (source, target) if unit not in STAGES]
            if unknown:
                problems.append(
                    f"{rel}:{line}: hsae/{unknown[0]} has no stage; add it to STAGES in "
                    "tests/test_layering.py (and to the README's layout)"
                )
                continue
            s, t = STAGES[source], STAGES[target]
            if t == BESIDE:
                continue
            if s == BESIDE or t > s or (t == s and (source, target) not in SAME_STAGE_OK):
                where = "beside the pipeline" if s == BESIDE else f"stage {s}"
                problems.append(
                    f"{rel}:{line} imports {target_module}: {source} ({where}) must not import "
                    f"{target} (stage {t}); move what both need beside the pipeline or upstream"
                )
    return problems


def test_imports_flow_one_way():
    problems = layering_violations(ROOT)
    assert not problems, "imports against the flow:\n" + "\n".join(problems)


def test_a_planted_upstream_import_is_caught(tmp_path):
    """The check itself: a backbone importing a metric inside a function, a config importing
    the study, and a relative import from training into metrics are reported; downstream and
    beside imports are not."""
    files = {
        "hsae/__init__.py": "",
        "hsae/errors.py": "",
        "hsae/config.py": "def f():\n    from hsae.study.config import StudyConfig\n",
        "hsae/backbones/__init__.py": "from hsae.errors import HsaeError\n",
        "hsae/backbones/stand_in.py": "def g():\n    from hsae.metrics.hierarchy import cpcc\n",
        "hsae/training/run.py": "from ..metrics import interp\nfrom hsae import sae\n",
        "hsae/evaluation/step3.py": "import hsae.metrics.interp\nfrom hsae.training import run\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    problems = layering_violations(tmp_path)
    assert len(problems) == 3, problems
    assert any(p.startswith("hsae/config.py:2 imports hsae.study.config") for p in problems)
    assert any(p.startswith("hsae/backbones/stand_in.py:2 imports hsae.metrics") for p in problems)
    assert any(p.startswith("hsae/training/run.py:1 imports hsae.metrics") for p in problems)
