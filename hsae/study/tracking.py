"""The study's W&B run of job type ``compare``: the report's verdict and step-1 tables, its
figures, and a summary to compare studies by in the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsae.config import LoggerConfig, flatten


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


def step1_table(results: dict[str, Any]) -> dict[str, Any]:
    """Every unit's step-1 metrics (``hier/*``, ``part_whole/*``; None where undefined)."""
    records = results["step1"]
    keys = sorted({k for r in records.values() for k in r["metrics"]})
    rows = [
        [u["name"], u["kind"], u["layer"], *(records[u["name"]]["metrics"].get(k) for k in keys)]
        for u in results["units"]
    ]
    return {"columns": ["unit", "kind", "layer", *keys], "rows": rows}


def log_compare_run(
    results: dict[str, Any], out_dir: Path, figures: dict[str, Path], logger_cfg: LoggerConfig
) -> None:
    """The study's W&B run (job type ``compare``): the verdict per family in the summary, the
    verdict and step-1 tables, and the report's figures."""
    from hsae.tracking import log_standalone_run  # Lightning's loggers: only when logging

    study = results["study"]
    summary: dict[str, Any] = {"n_units": len(results["units"]), "n_saes": len(results["saes"])}
    for layer in results["verdict"]["layers"]:
        pos = layer["layer_pos"]
        summary[f"study/precondition_holds/pos{pos}"] = int(layer["precondition"]["holds"])
        for fam in layer["families"]:
            summary[f"study/{fam['family']}/status/pos{pos}"] = fam["status"]
            if fam["effect"]:
                summary[f"study/{fam['family']}/estimate/pos{pos}"] = fam["effect"]["estimate"]
    media: dict[str, Any] = {
        "study/verdict": verdict_table(results),
        "study/step1": step1_table(results),
    }
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
