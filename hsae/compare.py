"""Compare finished runs without the dashboard: a table (Markdown + CSV) and plots (PNG)
from every run dir under a folder (a multirun dir, or any tree of them).

Runs that differ only in ``seed`` are pooled: each metric is reported as the mean with a
95% confidence interval (Student t over seeds) next to the number of seeds.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from hsae.config import flatten, path_safe
from hsae.errors import HsaeError
from hsae.fingerprint import same_image_tower_warning
from hsae.rundir import METRICS, RunDir

log = logging.getLogger(__name__)

# Config keys that say what a run is, shown first in tables.
ID_KEYS = (
    "backbone.name",
    "backbone.layer",
    "backbone.tokens",
    "sae.arch",
    "sae.n_latents",
    "sae.k",
)
# Keys that never distinguish runs (paths, logging, plumbing).
IGNORED = (
    "cache.dir",
    "logger.",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "skip_finished",
)
# Two-sided 95% Student t quantiles by degrees of freedom (normal beyond 30).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(dof: int) -> float:
    known = [d for d in sorted(_T95) if d <= dof]
    return _T95[known[-1]] if dof <= 30 else 1.96


def collect_runs(root: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished run under ``root`` (flat config keys + metrics, + ``eval/...``
    from eval.json), and the metric names."""
    root = Path(root)
    if not root.is_dir():
        raise HsaeError(
            f"compare={root} is not a folder; pass a multirun dir (multirun/<date>/<time>)"
        )
    rows, metrics = [], set()
    for metrics_path in sorted(root.rglob(METRICS)):
        run_dir = metrics_path.parent
        files = RunDir(run_dir)
        if not files.cfg.exists():
            continue
        cfg = files.read_cfg()
        row: dict[str, Any] = {
            k: v for k, v in flatten(cfg["config"]).items() if not k.startswith(IGNORED)
        }
        row["run_dir"] = str(run_dir.relative_to(root))
        row["backbone.fingerprint"] = _image_tower_fingerprint(cfg)
        run_metrics = files.read_metrics()
        if files.eval.exists():
            evaluated = files.read_eval()["metrics"]
            run_metrics |= {f"eval/{k}": v for k, v in evaluated.items()}
        row.update(run_metrics)
        metrics |= set(run_metrics)
        rows.append(row)
    if not rows:
        raise HsaeError(f"no finished runs (run dirs with metrics.json and cfg.json) under {root}")
    return rows, sorted(metrics)


def _image_tower_fingerprint(cfg: dict) -> str | None:
    manifest = Path(cfg.get("cache", {}).get("train", "")) / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text())["spec"]["backbone"].get("fingerprint")


def same_image_tower(rows: list[dict[str, Any]]) -> list[str]:
    """A warning when backbones compared here share image-tower weights (e.g. CLIP and
    RE-CLIP): their vision SAEs then see identical activations."""
    fingerprints = {
        str(row.get("backbone.name")): row["backbone.fingerprint"]
        for row in rows
        if row.get("backbone.fingerprint")
    }
    warning = same_image_tower_warning(fingerprints)
    return [warning] if warning else []


def pool_seeds(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """Group runs that differ only in seed; metrics become mean, ci95 and n."""
    varying = [
        k
        for k in sorted({k for r in rows for k in r})
        if k not in metrics and k not in ("seed", "run_dir")
    ]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(json.dumps(row.get(k), sort_keys=True) for k in varying)].append(row)
    pooled = []
    for members in groups.values():
        out = {k: members[0].get(k) for k in varying}
        out["n_seeds"] = len(members)
        for name in metrics:
            values = [float(m[name]) for m in members if m.get(name) is not None]
            if not values:
                continue
            mean = sum(values) / len(values)
            out[name] = mean
            if len(values) > 1:
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                out[f"{name}_ci95"] = t95(len(values) - 1) * sd / math.sqrt(len(values))
        pooled.append(out)
    return pooled


def _columns(rows: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    keys = {k for r in rows for k in r}
    varying = [
        k
        for k in sorted(keys - set(metrics) - set(ID_KEYS))
        if not k.endswith("_ci95")
        and k != "n_seeds"
        and len({json.dumps(r.get(k)) for r in rows}) > 1
    ]
    ids = [k for k in ID_KEYS if k in keys]
    shown = []
    for m in metrics:
        shown.append(m)
        if f"{m}_ci95" in keys:
            shown.append(f"{m}_ci95")
    return ids + varying + (["n_seeds"] if "n_seeds" in keys else []) + shown


def sort_key(value: Any) -> tuple:
    """Numbers by value (k = 4, 8, 16, not "16" < "4"), then text, then missing values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    if value is None:
        return (2, 0.0, "")
    return (1, 0.0, value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def write_tables(
    rows: list[dict[str, Any]], metrics: list[str], out_dir: Path, notes: list[str] = ()
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows, metrics)
    rows = sorted(rows, key=lambda r: tuple(sort_key(r.get(k)) for k in columns[:6]))
    csv_path, md_path = out_dir / "runs.csv", out_dir / "runs.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = [f"> **Note**: {note}\n" for note in notes]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both axes (lower x = sparser, lower y = better), sorted by x."""
    front, best_y = [], math.inf
    for x, y in sorted(points):
        if y < best_y:
            front.append((x, y))
            best_y = y
    return front


# Axes drawn on a log scale: widths and sparsities span decades.
LOG_AXES = ("l0", "sae.n_latents", "sae.k")


def _plain_number(value: float, _pos: Any = None) -> str:
    """``4``, ``16,384``, ``0.5``, ``6.7``: as a table would write it."""
    if value >= 1 and value == round(value):
        return f"{value:,.0f}"
    return f"{value:.3g}"


def make_xy_figure(
    rows: list[dict[str, Any]],
    x: str,
    y: str,
    group_by: tuple[str, ...],
    front: bool = False,
) -> Any:
    """``y`` against ``x``, one series per ``group_by`` value, error bars from ``_ci95``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (
        FixedLocator,
        FuncFormatter,
        LogLocator,
        NullFormatter,
        NullLocator,
    )  # fmt: skip

    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for row in rows:
        if row.get(x) is None or row.get(y) is None:
            continue
        label = " / ".join(str(row.get(k)) for k in group_by if k in row)
        series[label or "runs"].append(
            (float(row[x]), float(row[y]), float(row.get(f"{y}_ci95") or 0.0))
        )
    if not series:
        raise HsaeError(
            f"no run has both {x!r} and {y!r}; valid keys: {', '.join(sorted({k for r in rows for k in r}))}"
        )
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for label, pts in sorted(series.items()):
        pts.sort()
        xs, ys, err = zip(*pts, strict=True)
        line = ax.errorbar(xs, ys, yerr=err, fmt="o", ms=4, capsize=2, label=label)
        if front:
            fx, fy = zip(*pareto_front([(a, b) for a, b, _ in pts]), strict=True)
            ax.plot(fx, fy, "-", color=line[0].get_color(), alpha=0.7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if x in LOG_AXES:
        ax.set_xscale("log")
        # Plain numbers (4, 8, 16), not matplotlib's "4 x 10^0". A swept setting (k,
        # width) gets its ticks at the values the runs have; a measured one (l0) at 1-2-5.
        values = sorted({p[0] for pts in series.values() for p in pts if p[0] > 0})
        if x.startswith("sae.") and len(values) <= 12:
            ax.xaxis.set_major_locator(FixedLocator(values))
        else:
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=" / ".join(group_by), title_fontsize=7)
    fig.tight_layout()
    return fig


def plot_xy(
    rows: list[dict[str, Any]],
    x: str,
    y: str,
    out_path: Path,
    group_by: tuple[str, ...],
    front: bool = False,
) -> Path:
    import matplotlib.pyplot as plt

    fig = make_xy_figure(rows, x, y, group_by, front)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


WANDB_PREFIX = "wandb:"


def collect_wandb_runs(path: str, api: Any = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows like ``collect_runs`` from the W&B runs of a group: ``entity/project/group``.

    hsae logs flat config keys and the documented metric names as summary keys, so a W&B
    run maps to a row without renaming; only finished ``train`` runs are taken."""
    parts = path.split("/")
    if len(parts) != 3 or not all(parts):
        raise HsaeError(f"compare=wandb:{path}: expected compare=wandb:<entity>/<project>/<group>")
    entity, project, group = parts
    if api is None:
        import wandb

        api = wandb.Api()
    rows, metrics = [], set()
    for run in api.runs(f"{entity}/{project}", filters={"group": group, "jobType": "train"}):
        if getattr(run, "state", "finished") != "finished":
            continue
        row = {k: v for k, v in dict(run.config).items() if not k.startswith(IGNORED)}
        row["run_dir"] = f"wandb:{run.id}"
        summary = {
            k: v
            for k, v in dict(run.summary).items()
            if not k.startswith(("_", "train/", "val/", "latents/", "lr", "epoch", "trainer/"))
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
        row.update(summary)
        metrics |= set(summary)
        rows.append(row)
    if not rows:
        raise HsaeError(f"no finished train runs in W&B group {group!r} of {entity}/{project}")
    return rows, sorted(metrics)


def compare(
    root: str | Path,
    x: str | None = None,
    y: str | None = None,
    logger_cfg: Any = None,
    out_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Tables and plots for every run under ``root`` (a folder, or ``wandb:entity/project/
    group``), written to ``root/compare/`` (or ``out_dir``); logged as a W&B run of
    job_type ``compare`` when ``logger_cfg`` says W&B."""
    if str(root).startswith(WANDB_PREFIX):
        group_path = str(root)[len(WANDB_PREFIX) :]
        rows, metrics = collect_wandb_runs(group_path)
        root = Path(out_dir or f"compare-{path_safe(group_path)}").resolve()
        out_dir = root
    else:
        root = Path(root).resolve()
        rows, metrics = collect_runs(root)
    notes = same_image_tower(rows)
    for note in notes:
        log.warning(note)
    pooled = pool_seeds(rows, metrics)
    out_dir = Path(out_dir) if out_dir is not None else root / "compare"
    md_path, csv_path = write_tables(pooled, metrics, out_dir, notes)
    outputs = {"table_md": md_path, "table_csv": csv_path}
    group = ("backbone.name", "backbone.layer", "sae.arch")
    if all("l0" in r and "fvu" in r for r in pooled):
        outputs["fvu_vs_l0"] = plot_xy(
            pooled, "l0", "fvu", out_dir / "fvu_vs_l0.png", group, front=True
        )
    if all("dead_fraction" in r and "sae.n_latents" in r for r in pooled):
        outputs["dead_vs_width"] = plot_xy(
            pooled,
            "sae.n_latents",
            "dead_fraction",
            out_dir / "dead_fraction_vs_n_latents.png",
            group,
        )
    if x and y:
        name = f"{y}_vs_{x}".replace("/", "_")
        outputs[name] = plot_xy(pooled, x, y, out_dir / f"{name}.png", group)
    if logger_cfg is not None:
        _log_compare(logger_cfg, root, out_dir, pooled, metrics, outputs)
    return outputs


def _log_compare(
    logger_cfg: Any, root: Path, out_dir: Path, pooled: list[dict[str, Any]], metrics: list[str],
    outputs: dict[str, Path],
) -> None:  # fmt: skip
    from hsae.tracking import log_standalone_run

    columns = _columns(pooled, metrics)
    media: dict[str, Any] = {
        "compare/runs": {"columns": columns, "rows": [[r.get(c) for c in columns] for r in pooled]}
    }
    media |= {f"compare/{k}": path for k, path in outputs.items() if path.suffix == ".png"}
    log_standalone_run(
        logger_cfg, out_dir, f"compare/{root.name}", root.name, "compare",
        {"compare.root": str(root)}, {"n_runs": len(pooled)}, media,
    )  # fmt: skip
