"""The study report's PNGs, drawn from ``results.json`` alone (metric vs L0 per kind, step 1
per backbone, effects vs L0, backbone hierarchy vs SAE interpretability)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hsae.study.numbers import fmt, mean_finite

KIND_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


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
                    xs = [mean_finite([p[0] for p in by_k[k]]) for k in ks]
                    ys = [mean_finite([p[1] for p in by_k[k]]) for k in ks]
                    ax.plot(xs, ys, styles[e_i % 4], color=colour, alpha=0.25, lw=0.8)
                    for k, x, y in zip(ks, xs, ys, strict=True):
                        kind_pts[k].append((x, y))
                if kind_pts:
                    ks = sorted(kind_pts)
                    ax.plot(
                        [mean_finite([p[0] for p in kind_pts[k]]) for k in ks],
                        [mean_finite([p[1] for p in kind_pts[k]]) for k in ks],
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
