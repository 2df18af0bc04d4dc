"""The study's report, written from ``results.json`` alone: ``report.md``, its PNGs, and a
W&B run of job type ``compare`` with the same verdict table and plots.

Every number printed goes through ``fmt`` from a value held in the results, so the report
can be checked against them (tests/test_study_report.py does).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hsae.config import LoggerConfig, flatten
from hsae.rundir import write_atomic
from hsae.study.verdict import FAMILIES

log = logging.getLogger("hsae.study")
KIND_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def fmt(value: Any) -> str:
    """How the report prints a number (3 significant digits; integers as integers)."""
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _ci(effect: dict[str, Any] | None) -> str:
    if effect is None:
        return "n/a"
    return f"[{fmt(effect['ci_low'])}, {fmt(effect['ci_high'])}]"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# ---- plots -----------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _l0_axis(ax, ticks: list[float]) -> None:
    """Log L0 axis labelled at the grid's values (plain numbers, not powers of ten)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _kind_colours(results: dict[str, Any]) -> dict[str, str]:
    kinds = [k["label"] for k in results["study"]["kinds"]]
    return {k: KIND_COLOURS[i % len(KIND_COLOURS)] for i, k in enumerate(kinds)}


def plot_vs_l0(
    results: dict[str, Any], metrics: list[str], pos: int, out_path: Path
) -> Path | None:
    """Each metric against L0: thin lines per backbone network (mean over SAE seeds), thick
    lines per kind (mean over networks), one line style per expansion."""
    saes = [s for s in results["saes"] if s["layer_pos"] == pos]
    metrics = [m for m in metrics if any(s["metrics"].get(m) is not None for s in saes)]
    if not metrics:
        return None
    plt = _plt()
    colours = _kind_colours(results)
    styles = ("-", "--", ":", "-.")
    n_cols = min(3, len(metrics))
    n_rows = math.ceil(len(metrics) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), dpi=110, squeeze=False
    )
    expansions = sorted({s["expansion"] for s in saes})
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for kind, colour in colours.items():
            for e_i, expansion in enumerate(expansions):
                per_net: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(
                    lambda: defaultdict(list)
                )
                for s in saes:
                    if (
                        s["kind"] == kind
                        and s["expansion"] == expansion
                        and s["metrics"].get(metric) is not None
                    ):
                        per_net[s["network"]][s["k"]].append(
                            (s["metrics"]["l0"], s["metrics"][metric])
                        )
                kind_pts: dict[int, list[tuple[float, float]]] = defaultdict(list)
                for by_k in per_net.values():
                    ks = sorted(by_k)
                    xs = [_mean([p[0] for p in by_k[k]]) for k in ks]
                    ys = [_mean([p[1] for p in by_k[k]]) for k in ks]
                    ax.plot(xs, ys, styles[e_i % 4], color=colour, alpha=0.25, lw=0.8)
                    for k, x, y in zip(ks, xs, ys, strict=True):
                        kind_pts[k].append((x, y))
                if kind_pts:
                    ks = sorted(kind_pts)
                    ax.plot(
                        [_mean([p[0] for p in kind_pts[k]]) for k in ks],
                        [_mean([p[1] for p in kind_pts[k]]) for k in ks],
                        styles[e_i % 4],
                        marker="o",
                        ms=3,
                        color=colour,
                        lw=2,
                        label=f"{kind}, expansion {expansion}",
                    )
        _l0_axis(ax, [float(s["k"]) for s in saes])
        ax.set_xlabel("L0 (active latents per image)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        "thin: one backbone network (mean over SAE seeds); thick: mean of the kind", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_step1(results: dict[str, Any], metrics: list[str], out_path: Path) -> Path:
    """Step-1 scores of every backbone unit, one panel per metric, grouped by kind and layer."""
    plt = _plt()
    colours = _kind_colours(results)
    metrics = [
        m
        for m in metrics
        if any(r["metrics"].get(m) is not None for r in results["step1"].values())
    ]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.4 * len(metrics), 3.4), dpi=110, squeeze=False
    )
    units = results["units"]
    positions = sorted({u["layer_pos"] for u in units})
    kinds = list(colours)
    for ax, metric in zip(axes.flat, metrics, strict=True):
        for p_i, pos in enumerate(positions):
            for k_i, kind in enumerate(kinds):
                x = p_i * (len(kinds) + 1) + k_i
                ys = [
                    results["step1"][u["name"]]["metrics"].get(metric)
                    for u in units
                    if u["kind"] == kind and u["layer_pos"] == pos
                ]
                ys = [y for y in ys if y is not None]
                ax.scatter(
                    [x] * len(ys),
                    ys,
                    color=colours[kind],
                    s=18,
                    alpha=0.7,
                    label=kind if p_i == 0 else None,
                )
                if ys:
                    ax.plot([x - 0.3, x + 0.3], [np.mean(ys)] * 2, color=colours[kind], lw=2)
        ax.set_xticks([p * (len(kinds) + 1) + (len(kinds) - 1) / 2 for p in range(len(positions))])
        ax.set_xticklabels([f"layer position {p}" for p in positions], fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("step 1: each point one backbone network; bar = kind mean", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_effects_vs_l0(results: dict[str, Any], pos: int, out_path: Path) -> Path | None:
    """Treatment minus baseline at each matched L0, with its bootstrap interval."""
    entry = results["comparison"]["layers"][pos]
    series = {m: pts for m, pts in entry["per_l0"].items() if pts}
    if not series:
        return None
    plt = _plt()
    n = len(series)
    n_cols = min(3, n)
    n_rows = math.ceil(n / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), dpi=110, squeeze=False
    )
    verdict = results["verdict"]
    for ax, (metric, pts) in zip(axes.flat, series.items(), strict=False):
        xs = [p["l0"] for p in pts]
        ys = [p["estimate"] for p in pts]
        err = [
            [p["estimate"] - p["ci_low"] for p in pts],
            [p["ci_high"] - p["estimate"] for p in pts],
        ]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, color="tab:purple")
        ax.axhline(0, color="grey", lw=1)
        _l0_axis(ax, xs)
        ax.set_xlabel("matched L0")
        ax.set_ylabel(f"{verdict['treatment']} - {verdict['baseline']}")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    ci = fmt(results["comparison"]["ci_percent"])
    fig.suptitle(
        f"difference at matched L0 with {ci}% hierarchical-bootstrap intervals", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def plot_scatter(results: dict[str, Any], pos: int, out_path: Path) -> Path | None:
    """Backbone step-1 hierarchy score vs its SAEs' interpretability score, per network."""
    points = results["comparison"]["layers"][pos].get("scatter") or []
    if not points:
        return None
    plt = _plt()
    colours = _kind_colours(results)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    for kind, colour in colours.items():
        pts = [p for p in points if p["kind"] == kind]
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], color=colour, label=kind, s=30)
        for p in pts:
            ax.annotate(p["network"], (p["x"], p["y"]), fontsize=6, alpha=0.7)
    scatter = results["comparison"]["layers"][pos]["scatter_info"]
    ax.set_xlabel(f"backbone step 1: {scatter['x']}")
    ax.set_ylabel(f"SAE step 3: {scatter['y']} (matched L0)")
    ax.set_title(f"Spearman rho over networks = {fmt(scatter['spearman'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


# ---- the Markdown ----------------------------------------------------------------------


def _effect_row(
    label: str, better: str, effect: dict[str, Any] | None, status: str, ci: Any
) -> str:
    if effect is None:
        return f"| {label} | {better} | n/a | n/a | n/a | n/a | n/a | n/a | {status} |"
    return (
        f"| {label} | {better} | {fmt(effect['baseline_mean'])} | {fmt(effect['treatment_mean'])} | "
        f"{fmt(effect['estimate'])} | {_ci(effect)} | {fmt(effect['effect_size'])} | "
        f"{fmt(effect['p_test'])} | {status} |"
    )


def _better(b: int) -> str:
    return {1: "higher", -1: "lower"}.get(b, "(descriptive)")


def write_markdown(results: dict[str, Any], out_dir: Path, figures: dict[str, Path]) -> Path:
    study, verdict, comparison = results["study"], results["verdict"], results["comparison"]
    base, treat = verdict["baseline"], verdict["treatment"]
    ci = fmt(comparison["ci_percent"])
    header = f"| metric | better | {base} | {treat} | {treat} - {base} | {ci}% CI | effect size | p | call |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    lines = [
        f"# Study `{study['name']}`",
        "",
        f"**Hypothesis.** {verdict['hypothesis']}. Treatment kind `{treat}`, baseline kind `{base}`. "
        "Every number below is read from `results.json` in this folder.",
        "",
    ]
    for note in comparison["identical_towers"]:
        lines += [
            f"> **Identical image towers.** {note}. Vision-side families are not compared "
            "for this pair; what differs is compared instead (names through the text tower, "
            "joint image-text hierarchy metrics).",
            "",
        ]
    work = results["work"]
    lines += [
        f"Size: {len(results['units'])} backbone units, {work['saes_total']} SAEs "
        f"({work['bank_jobs']} bank jobs: {work['bank_jobs_trained']} trained in this run, "
        f"{work['saes_evaluated']} SAEs evaluated in this run); {study['n_boot']} bootstrap replicates, "
        f"{study['n_image_halves']} image half-samples. Design: "
        + (
            "paired (same backbone seeds and SAE seeds in both kinds)."
            if comparison["paired"]
            else "unpaired."
        ),
        "",
        "## Verdict",
        "",
    ]
    for layer in verdict["layers"]:
        pre = layer["precondition"]
        eff = pre["effect"]
        layers = ", ".join(f"{k} layer {v}" for k, v in layer["layers"].items())
        lines.append(f"### Layer position {layer['layer_pos']} ({layers})")
        lines.append("")
        if eff is None:
            lines.append(f"**Precondition (step 1):** `{pre['metric']}` could not be compared.")
        else:
            word = "HOLDS" if pre["holds"] else "DOES NOT HOLD"
            lines.append(
                f"**Precondition (step 1) {word}:** `{pre['metric']}` of the backbones, {treat} - "
                f"{base} = {fmt(eff['estimate'])} ({ci}% CI {_ci(eff)}, effect size "
                f"{fmt(eff['effect_size'])}; {base} {fmt(eff['baseline_mean'])}, {treat} "
                f"{fmt(eff['treatment_mean'])}). "
                + (
                    "The hierarchy-trained backbones are measurably more hierarchical, so step 3 "
                    "tests the hypothesis."
                    if pre["holds"]
                    else "The backbones do not differ as the study assumes: the step-3 verdicts below "
                    "do not test the hypothesis."
                )
            )
        lines += [
            "",
            "| family | primary metric | better | " + f"{treat} - {base} | {ci}% CI | "
            "effect size | verdict | what would falsify it |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for fam in layer["families"]:
            e = fam["effect"]
            status = fam["status"] + (f" ({fam['reason']})" if fam["reason"] else "")
            lines.append(
                f"| {fam['title']} | `{fam['metric']}` | {fam['better']} | "
                f"{fmt(e['estimate']) if e else 'n/a'} | {_ci(e)} | "
                f"{fmt(e['effect_size']) if e else 'n/a'} | **{status}** | {fam['falsified_by']} |"
            )
        lines.append("")
        if pre["effect"] and pre["effect"]["paired"] and pre["effect"].get("min_p_sign_flip"):
            lines += [
                f"With {pre['effect']['n_units'][0]} paired backbone seeds per kind the exact "
                "sign-flip test cannot give p below "
                f"{fmt(pre['effect']['min_p_sign_flip'])}: the intervals carry the verdict, "
                "and more backbone seeds would sharpen it.",
                "",
            ]
        lines.append(
            "Plain language: "
            + " ".join(
                f"{fam['title'][0].upper()}{fam['title'][1:]}: {fam['status']}."
                for fam in layer["families"]
            )
        )
        lines.append("")
    lines += [
        "The verdict reads only each family's primary metric (fixed in `hsae/study/verdict.py` "
        "before any study ran): its interval for treatment minus baseline, turned to the "
        "metric's better direction, above 0 = supported, below 0 = contradicted, covering 0 = "
        "inconclusive at this size. Intervals are not corrected for the number of families.",
        "",
    ]
    if results["stand_ins"]:
        lines += [
            "## Stand-in backbones",
            "",
            "Held-out metrics recorded when each was trained (`hsae.backbones.stand_in`).",
            "",
        ]
        keys = sorted({k for s in results["stand_ins"].values() for k in s["metrics"]})
        lines += ["| network | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for network, s in sorted(results["stand_ins"].items()):
            lines.append(
                f"| {network} | " + " | ".join(fmt(s["metrics"].get(k)) for k in keys) + " |"
            )
        lines.append("")
    lines += ["## Step 1: hierarchy of each backbone", ""]
    step1_keys = [
        study["step1_metric"],
        "hier/consistency",
        "hier/full_path_acc",
        "hier/mistake_severity",
        "hier/ami@mean",
    ]
    lines += [
        "| unit | kind | layer | " + " | ".join(step1_keys) + " |",
        "|---|---|---|" + "---|" * len(step1_keys),
    ]
    for u in results["units"]:
        m = results["step1"][u["name"]]["metrics"]
        lines.append(
            f"| {u['name']} | {u['kind']} | {u['layer']} | "
            + " | ".join(fmt(m.get(k)) for k in step1_keys)
            + " |"
        )
    lines.append("")
    for entry in comparison["layers"]:
        lines += [f"Step 1 compared, layer position {entry['layer_pos']}:", "", header, rule]
        for key, info in entry["step1"].items():
            lines.append(
                _effect_row(f"`{key}`", _better(info["better"]), info["effect"], info["call"], ci)
            )
        for key, info in entry["joint"].items():
            lines.append(
                _effect_row(
                    f"`{key}` (joint image-text)",
                    _better(info["better"]),
                    info["effect"],
                    info["call"],
                    ci,
                )
            )
        lines.append("")
    if "step1" in figures:
        lines += [f"![step 1]({figures['step1'].name})", ""]
    lines += [
        "## Step 3: SAEs compared at matched L0",
        "",
        f"Matched L0 values: {', '.join(fmt(t) for t in comparison['l0_targets'])} (each "
        "backbone's metric-vs-L0 curve read there, never extrapolated).",
        "",
    ]
    for entry in comparison["layers"]:
        pos = entry["layer_pos"]
        lines += [f"### Layer position {pos}", "", header, rule]
        for family in entry["families"].values():
            for key, info in family["metrics"].items():
                lines.append(
                    _effect_row(
                        f"`{key}`", _better(info["better"]), info["effect"], info["call"], ci
                    )
                )
        lines.append("")
        for name, title in (
            (f"fronts_{pos}", "SAE quality fronts (FVU vs L0)"),
            (f"metrics_{pos}", "interpretability and control metrics vs L0"),
            (f"effects_{pos}", "difference at matched L0"),
            (f"scatter_{pos}", "backbone hierarchy vs SAE interpretability"),
        ):
            if name in figures:
                lines += [f"**{title}**", "", f"![{title}]({figures[name].name})", ""]
        info = entry.get("scatter_info")
        if info:
            lines += [
                f"Scatter: Spearman rho between `{info['x']}` and `{info['y']}` over "
                f"{info['n']} backbone networks = {fmt(info['spearman'])}.",
                "",
            ]
    timing = results["timing_s"]
    lines += [
        "## Method",
        "",
        "SAEs are compared at matched L0 only: each backbone's metric-vs-L0 curve (one per SAE "
        "seed and expansion) is interpolated linearly in log L0 at the matched values (for TopK "
        "L0 = k, so the values are measured, not interpolated). Intervals: hierarchical "
        "bootstrap, each replicate drawing an image half-sample (every metric recomputed on "
        "complementary halves of the held-out images; control metrics and dead fractions of "
        "patch-token SAEs have no image draw), backbone networks with replacement within each "
        "kind, then SAE seeds within each network. Paired designs draw the same seeds for both "
        "kinds. Effect size: Cohen's d over backbone networks (d_z for paired designs); p: the "
        "test named in `results.json` (exact sign-flip over paired seeds, or Welch). With few "
        "backbone seeds per kind the bootstrap interval is approximate (a resample of n units "
        "has n^n orderings but few distinct means) and tends to be too narrow: read it with the "
        "exact test's p. Details: docs/study.md.",
        "",
        "Timing of this run (seconds, wall / CPU of this process): "
        + ", ".join(
            f"{k} {fmt(v)} / {fmt(results.get('timing_cpu_s', {}).get(k))}"
            for k, v in timing.items()
        )
        + ".",
        "",
    ]
    if results.get("browser"):
        b = results["browser"]
        lines += [
            "## Feature browser",
            "",
            f"[Side-by-side page]({b['index']}): each kind's latents for the same class, "
            f"for the SAE at expansion {b['expansion']} and k {b['k']} of each kind's first "
            "backbone seed and first SAE seed; one page per kind: "
            + ", ".join(
                f"[{label}]({Path(b['index']).parent.as_posix()}/{label}/index.html)"
                for label in b["saes"]
            )
            + ".",
            "",
        ]
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def add_scatter(results: dict[str, Any]) -> None:
    """Per layer, one point per backbone network: its step-1 score and its SAEs' primary
    hierarchy-alignment score (mean over SAE seeds and the matched cells). In the results,
    so the report's numbers come from them."""
    from scipy.stats import spearmanr

    study = results["study"]
    y_key = next(f.primary.key for f in FAMILIES if f.key == "hierarchy")
    for entry in results["comparison"]["layers"]:
        pos = entry["layer_pos"]
        cells = entry["families"]["hierarchy"]["metrics"].get(y_key, {}).get("cells", [])
        keep = {(c["expansion"], c["l0"]) for c in cells}
        points = []
        for u in results["units"]:
            if u["layer_pos"] != pos:
                continue
            x = results["step1"][u["name"]]["metrics"].get(study["step1_metric"])
            ys = []
            for s in results["saes"]:
                if s["unit"] == u["name"] and (s["expansion"], float(s["k"])) in keep:
                    ys.append(s["metrics"].get(y_key))
            y = _mean([v for v in ys if v is not None])
            if x is not None and math.isfinite(y):
                points.append({"network": u["network"], "kind": u["kind"], "x": x, "y": y})
        rho = math.nan
        if len(points) >= 3:
            rho = float(spearmanr([p["x"] for p in points], [p["y"] for p in points]).statistic)
        entry["scatter"] = points
        entry["scatter_info"] = {
            "x": study["step1_metric"],
            "y": y_key,
            "n": len(points),
            "spearman": None if not math.isfinite(rho) else rho,
        }


def write_report(
    results: dict[str, Any], out_dir: Path, logger_cfg: LoggerConfig | None = None
) -> Path:
    """``report.md`` and PNGs in ``out_dir``; the W&B compare run when ``logger_cfg`` says so.
    Adds the scatter points to ``results`` (the caller writes them to results.json)."""
    from hsae.study.run import RESULTS, _write_json

    results["comparison"]["ci_percent"] = round(100 * results["study"]["ci"], 6)
    add_scatter(results)
    _write_json(out_dir / RESULTS, results)
    figures: dict[str, Path] = {}
    step1_keys = [
        results["study"]["step1_metric"],
        "hier/consistency",
        "hier/mistake_severity",
        "hier/ami@mean",
    ]
    figures["step1"] = plot_step1(results, step1_keys, out_dir / "step1.png")
    interp_keys = [
        m.key
        for f in FAMILIES
        if f.key != "quality"
        for m in (f.primary, *f.secondary)
        if m.better != 0
    ]
    for entry in results["comparison"]["layers"]:
        pos = entry["layer_pos"]
        for name, path in (
            (
                f"fronts_{pos}",
                plot_vs_l0(
                    results, ["fvu", "dead_fraction"], pos, out_dir / f"fvu_vs_l0_pos{pos}.png"
                ),
            ),
            (
                f"metrics_{pos}",
                plot_vs_l0(results, interp_keys, pos, out_dir / f"metrics_vs_l0_pos{pos}.png"),
            ),
            (
                f"effects_{pos}",
                plot_effects_vs_l0(results, pos, out_dir / f"effects_vs_l0_pos{pos}.png"),
            ),
            (
                f"scatter_{pos}",
                plot_scatter(results, pos, out_dir / f"scatter_step1_vs_step3_pos{pos}.png"),
            ),
        ):
            if path is not None:
                figures[name] = path
    report = write_markdown(results, out_dir, figures)
    if logger_cfg is not None:
        _log_wandb(results, out_dir, figures, logger_cfg)
    return report


def verdict_table(results: dict[str, Any]) -> dict[str, Any]:
    columns = [
        "layer_pos",
        "family",
        "metric",
        "better",
        "estimate",
        "ci_low",
        "ci_high",
        "effect_size",
        "status",
    ]
    rows = []
    for layer in results["verdict"]["layers"]:
        pre = layer["precondition"]
        e = pre["effect"] or {}
        rows.append(
            [
                layer["layer_pos"],
                "precondition (step 1)",
                pre["metric"],
                "higher",
                e.get("estimate"),
                e.get("ci_low"),
                e.get("ci_high"),
                e.get("effect_size"),
                "holds" if pre["holds"] else "does not hold",
            ]
        )
        for fam in layer["families"]:
            e = fam["effect"] or {}
            rows.append(
                [
                    layer["layer_pos"],
                    fam["family"],
                    fam["metric"],
                    fam["better"],
                    e.get("estimate"),
                    e.get("ci_low"),
                    e.get("ci_high"),
                    e.get("effect_size"),
                    fam["status"],
                ]
            )
    return {"columns": columns, "rows": rows}


def _log_wandb(
    results: dict[str, Any], out_dir: Path, figures: dict[str, Path], logger_cfg: LoggerConfig
) -> None:
    from hsae.tracking import log_standalone_run

    study = results["study"]
    summary: dict[str, Any] = {"n_units": len(results["units"]), "n_saes": len(results["saes"])}
    for layer in results["verdict"]["layers"]:
        pos = layer["layer_pos"]
        summary[f"study/precondition_holds/pos{pos}"] = int(layer["precondition"]["holds"])
        for fam in layer["families"]:
            summary[f"study/{fam['family']}/status/pos{pos}"] = fam["status"]
            if fam["effect"]:
                summary[f"study/{fam['family']}/estimate/pos{pos}"] = fam["effect"]["estimate"]
    media: dict[str, Any] = {"study/verdict": verdict_table(results)}
    media |= {f"study/{name}": path for name, path in figures.items()}
    log_standalone_run(
        logger_cfg,
        out_dir,
        f"study/{study['name']}",
        f"study_{study['name']}",
        "compare",
        flatten({"study": study}),
        summary,
        media,
    )
