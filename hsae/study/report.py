"""The study's report, written from ``results.json`` alone: ``report.md``, its PNGs, and a
W&B run of job type ``compare`` with the same verdict table and plots (``tracking``).

Every number printed goes through ``fmt`` from a value held in the results, so the report
can be checked against them (tests/test_study_report.py does).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hsae.config import LoggerConfig
from hsae.rundir import write_atomic
from hsae.study.figures import plot_effects_vs_l0, plot_scatter, plot_step1, plot_vs_l0
from hsae.study.numbers import ci_text, fmt, mean_finite
from hsae.study.tracking import log_compare_run
from hsae.study.verdict import FAMILIES

log = logging.getLogger("hsae.study")


# ---- the Markdown ----------------------------------------------------------------------


def _effect_row(
    label: str, better: str, effect: dict[str, Any] | None, status: str, ci: Any
) -> str:
    if effect is None:
        return f"| {label} | {better} | n/a | n/a | n/a | n/a | n/a | n/a | {status} |"
    return (
        f"| {label} | {better} | {fmt(effect['baseline_mean'])} | {fmt(effect['treatment_mean'])} | "
        f"{fmt(effect['estimate'])} | {ci_text(effect)} | {fmt(effect['effect_size'])} | "
        f"{fmt(effect['p_test'])} | {status} |"
    )


def part_whole_section(results: dict[str, Any]) -> list[str]:
    """The intra-image (part-whole) step-1 scores of each unit, when any unit has them
    (CAST, the CAST stand-in); the others' reason, once (docs/metrics.md)."""
    from hsae.metrics.part_whole import PART_WHOLE_KEYS

    records = [results["step1"][u["name"]] for u in results["units"]]
    if not any(r["metrics"].get(k) is not None for r in records for k in PART_WHOLE_KEYS):
        return []
    keys = [k for k in PART_WHOLE_KEYS if any(r["metrics"].get(k) is not None for r in records)]
    lines = [
        "Part-whole hierarchy inside each image (`part_whole/*`: the segment tree's nesting, "
        "its assignment confidence, agreement with the images' part and object masks; "
        "docs/metrics.md):",
        "",
        "| unit | kind | " + " | ".join(k.removeprefix("part_whole/") for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    reasons: dict[str, list[str]] = {}
    for u, r in zip(results["units"], records, strict=True):
        lines.append(
            f"| {u['name']} | {u['kind']} | "
            + " | ".join(fmt(r["metrics"].get(k)) for k in keys)
            + " |"
        )
        skipped = r.get("skipped", {})
        for why in {skipped[k] for k in keys if k in skipped}:
            reasons.setdefault(why, []).append(u["name"])
    lines.append("")
    for why, names in reasons.items():
        lines += [f"Not measured for {', '.join(names)}: {why}.", ""]
    return lines


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
        elif pre.get("against_chance") is not None:
            # The baseline kind has no such score (a ViT has no segment tree): the treatment
            # alone against the score's chance level.
            word = "HOLDS" if pre["holds"] else "DOES NOT HOLD"
            lines.append(
                f"**Precondition (step 1) {word}:** `{pre['metric']}` of the {treat} backbones "
                f"= {fmt(eff['treatment_mean'])} against its chance level "
                f"{fmt(pre['against_chance'])}: {treat} - chance = {fmt(eff['estimate'])} "
                f"({ci}% CI {ci_text(eff)}); {base} has no such score (undefined for it: "
                "see step 1). "
                + (
                    f"The {treat} backbones have the structure the study assumes, so step 3 "
                    "tests the hypothesis."
                    if pre["holds"]
                    else f"The {treat} backbones do not show the structure the study assumes: "
                    "the step-3 verdicts below do not test the hypothesis."
                )
            )
        else:
            word = "HOLDS" if pre["holds"] else "DOES NOT HOLD"
            lines.append(
                f"**Precondition (step 1) {word}:** `{pre['metric']}` of the backbones, {treat} - "
                f"{base} = {fmt(eff['estimate'])} ({ci}% CI {ci_text(eff)}, effect size "
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
                f"{fmt(e['estimate']) if e else 'n/a'} | {ci_text(e)} | "
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
    lines += part_whole_section(results)
    for entry in comparison["layers"]:
        lines += [f"Step 1 compared, layer position {entry['layer_pos']}:", "", header, rule]
        for key, info in entry["step1"].items():
            label = f"`{key}`"
            if info.get("against_chance") is not None:
                label += f" ({base} column: chance level)"
            lines.append(
                _effect_row(label, _better(info["better"]), info["effect"], info["call"], ci)
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
            y = mean_finite([v for v in ys if v is not None])
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
    from hsae.study.run import RESULTS
    from hsae.study.stages import write_json_record

    results["comparison"]["ci_percent"] = round(100 * results["study"]["ci"], 6)
    add_scatter(results)
    write_json_record(out_dir / RESULTS, results)
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
        log_compare_run(results, out_dir, figures, logger_cfg)
    return report
