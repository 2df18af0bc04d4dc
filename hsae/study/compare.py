"""Backbone kinds compared at matched L0, with a hierarchical bootstrap.

**Matched L0.** For each backbone unit, SAE seed and expansion, a metric's values over the
grid's k form a curve against the SAEs' measured L0. The curve is interpolated linearly in
log L0 at common target L0 values (for TopK, L0 = k, so at the grid's k the value is the
measured one); a target outside a curve's measured range is never extrapolated, and a
(expansion, target) cell missing for any unit is dropped for every unit, so both kinds are
always averaged over the same cells. SAEs at different sparsity are never compared.

**Hierarchical bootstrap.** Each replicate draws, in order: one image half-sample (the
held-out images split into complementary halves, every metric recomputed on each half; the
draw is ``estimate + (half - mean of its pair)``, which has the variance of the estimate
from all images; the same half for every SAE, since every backbone sees the same images;
step-3 interpretability estimates are the mean of the two halves, step-1 and the SAE's own
metrics are computed on all images, control has no image draw); backbone
units with replacement within each kind; SAE seeds with replacement within each unit. The
effect is the treatment kind's mean minus the baseline's, over units, seeds and cells. When
the design is paired (both kinds have the same backbone seeds and SAE seeds, as stand-ins
trained from the same seeds do), the same unit and seed indices are drawn for both kinds.

**Tests and effect sizes.** Per backbone unit, the mean over SAE seeds and cells; for a
paired design, the paired t-test and the exact sign-flip permutation test on the per-pair
differences, and Cohen's d_z; otherwise Welch's t-test on the unit means and Cohen's d
(pooled standard deviation of unit means). With one unit per kind there is no backbone-seed
replication: the interval then covers SAE seeds and images only (``n_units`` says so).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hsae.study import plan as plan_mod
from hsae.study.verdict import FAMILIES, JOINT_METRICS, STEP1_CHANCE, STEP1_SECONDARY, Metric, call

if TYPE_CHECKING:
    from hsae.study.config import StudyConfig


def interpolate_at(l0_p: np.ndarray, value_p: np.ndarray, targets_t: np.ndarray) -> np.ndarray:
    """A metric's curve (points at measured L0) read at target L0s: linear in log L0,
    NaN outside the measured range (never extrapolated) or where the value is NaN."""
    l0_p, value_p = np.asarray(l0_p, float), np.asarray(value_p, float)
    keep = np.isfinite(l0_p) & np.isfinite(value_p) & (l0_p > 0)
    out = np.full(len(targets_t), np.nan)
    if not keep.any():
        return out
    order = np.argsort(l0_p[keep])
    x, y = np.log(l0_p[keep][order]), value_p[keep][order]
    t = np.log(np.asarray(targets_t, float))
    # Within a tiny tolerance of the ends: TopK's measured L0 is k up to float error.
    inside = (t >= x[0] - 1e-6) & (t <= x[-1] + 1e-6)
    out[inside] = np.interp(t[inside], x, y)
    return out


def image_draws(estimate: float, halves: list[float]) -> np.ndarray:
    """``[estimate, draw_1, ..., draw_J]``. Halves come in complementary pairs; each draw
    moves the estimate by one half's deviation from its pair's mean, ``(h_a - h_b) / 2``,
    whose variance is that of an estimate from all the images (balanced half-samples).
    No halves: no image noise."""
    halves_arr = np.asarray(halves, float)
    if len(halves_arr) < 2 or len(halves_arr) % 2 or not np.isfinite(halves_arr).all():
        return np.array([estimate])
    pair_means = halves_arr.reshape(-1, 2).mean(axis=1).repeat(2)
    return np.concatenate([[estimate], estimate + halves_arr - pair_means])


@dataclass
class Effect:
    """Treatment minus baseline, in the metric's own units."""

    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    p_boot: float  # two-sided bootstrap p: 2 x the share of replicates on the other side of 0
    baseline_mean: float
    treatment_mean: float
    effect_size: float  # Cohen's d_z (paired) or d (unpaired) over backbone units; NaN if < 2
    test: str  # which test gave p_test
    p_test: float
    n_units: tuple[int, int]  # backbone units (baseline, treatment)
    n_seeds: int  # SAE seeds per unit
    n_cells: int  # (expansion, L0) cells averaged
    n_image_draws: int
    paired: bool
    min_p_sign_flip: float | None = None  # the exact test's smallest possible p (paired)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unit_means(values_usjc: np.ndarray) -> np.ndarray:
    return values_usjc[:, :, 0, :].mean(axis=(1, 2))


def hierarchical_bootstrap(
    baseline_usjc: np.ndarray,
    treatment_usjc: np.ndarray,
    paired: bool,
    n_boot: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """Bootstrap replicates of mean(treatment) - mean(baseline). Arrays are ``[units, SAE
    seeds, 1 + image draws, cells]`` (draw 0 is the full-sample value), finite everywhere."""
    rng = np.random.default_rng(seed)
    n_draws = baseline_usjc.shape[2]
    if treatment_usjc.shape[2] != n_draws:
        raise ValueError("both kinds need the same number of image draws")
    # One image draw per replicate, shared by every SAE (the images are the same for all).
    j_b = rng.integers(1, n_draws, size=n_boot) if n_draws > 1 else np.zeros(n_boot, int)

    def resample(values: np.ndarray, units_bu: np.ndarray, seeds_bus: np.ndarray) -> np.ndarray:
        picked = values[units_bu[:, :, None], seeds_bus, j_b[:, None, None]]  # [B, U, S, C]
        return picked.mean(axis=(1, 2, 3))

    n_ua, n_sa = baseline_usjc.shape[:2]
    n_ut, n_st = treatment_usjc.shape[:2]
    units_a = rng.integers(0, n_ua, size=(n_boot, n_ua))
    seeds_a = rng.integers(0, n_sa, size=(n_boot, n_ua, n_sa))
    if paired:
        units_t, seeds_t = units_a, seeds_a
    else:
        units_t = rng.integers(0, n_ut, size=(n_boot, n_ut))
        seeds_t = rng.integers(0, n_st, size=(n_boot, n_ut, n_st))
    return resample(treatment_usjc, units_t, seeds_t) - resample(baseline_usjc, units_a, seeds_a)


def sign_flip_p(diffs: np.ndarray) -> float:
    """Exact two-sided sign-flip permutation p-value of the mean of paired differences
    (all 2^n sign patterns; n <= 16)."""
    diffs = np.asarray(diffs, float)
    n = len(diffs)
    if n == 0 or n > 16:
        return math.nan
    observed = abs(diffs.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    stats = np.abs((signs * diffs).mean(axis=1))
    return float((stats >= observed - 1e-12).mean())


def compare_kinds(
    metric: str,
    baseline_usjc: np.ndarray,
    treatment_usjc: np.ndarray,
    paired: bool,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> Effect:
    from scipy import stats

    base_full = baseline_usjc[:, :, 0, :]
    treat_full = treatment_usjc[:, :, 0, :]
    estimate = float(treat_full.mean() - base_full.mean())
    boots = hierarchical_bootstrap(baseline_usjc, treatment_usjc, paired, n_boot, seed)
    alpha = (1 - ci) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    replicated = max(baseline_usjc.shape[0], treatment_usjc.shape[0]) > 1 or (
        baseline_usjc.shape[1] > 1 or baseline_usjc.shape[2] > 1
    )
    if not replicated:  # one unit, one SAE seed, no image draw: nothing to resample
        low = high = math.nan
    p_boot = float(min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean())))
    unit_a, unit_t = _unit_means(baseline_usjc), _unit_means(treatment_usjc)
    effect_size, p_test, test = math.nan, math.nan, "none (one backbone unit per kind)"
    if paired and len(unit_a) >= 2:
        diffs = unit_t - unit_a
        sd = diffs.std(ddof=1)
        effect_size = float(diffs.mean() / sd) if sd > 0 else math.nan
        p_t = float(stats.ttest_rel(unit_t, unit_a).pvalue) if sd > 0 else math.nan
        p_test = sign_flip_p(diffs)
        test = f"exact sign-flip over {len(diffs)} paired backbone seeds (paired t p={p_t:.3g})"
    elif len(unit_a) >= 2 and len(unit_t) >= 2:
        pooled = math.sqrt(
            ((len(unit_a) - 1) * unit_a.var(ddof=1) + (len(unit_t) - 1) * unit_t.var(ddof=1))
            / (len(unit_a) + len(unit_t) - 2)
        )
        effect_size = float((unit_t.mean() - unit_a.mean()) / pooled) if pooled > 0 else math.nan
        p_test = float(stats.ttest_ind(unit_t, unit_a, equal_var=False).pvalue)
        test = "Welch t over backbone units"
    return Effect(
        metric=metric,
        estimate=estimate,
        ci_low=float(low),
        ci_high=float(high),
        p_boot=p_boot,
        baseline_mean=float(base_full.mean()),
        treatment_mean=float(treat_full.mean()),
        effect_size=effect_size,
        test=test,
        p_test=p_test,
        n_units=(int(baseline_usjc.shape[0]), int(treatment_usjc.shape[0])),
        n_seeds=int(baseline_usjc.shape[1]),
        n_cells=int(baseline_usjc.shape[3]),
        n_image_draws=int(baseline_usjc.shape[2] - 1),
        paired=paired,
        min_p_sign_flip=2 / 2 ** len(unit_a) if paired and 2 <= len(unit_a) <= 16 else None,
    )


# ---- from the study's records to [units, seeds, draws, cells] arrays -------------------


def metric_value(metrics: dict[str, Any], metric: str) -> float:
    value = metrics.get(metric)
    return math.nan if value is None else float(value)


def sae_curves(
    records: list[dict[str, Any]],
    metric: str,
    layer_pos: int,
    expansions: list[int],
    targets: list[float],
) -> dict[tuple[str, int], np.ndarray]:
    """``(network, sae seed) -> [1 + image draws, expansions x targets]``: the metric read at
    each target L0 on each expansion's curve (L0 as measured on the full held-out split)."""
    out: dict[tuple[str, int], np.ndarray] = {}
    by_curve: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in records:
        if r["layer_pos"] == layer_pos:
            by_curve.setdefault((r["network"], r["sae_seed"], r["expansion"]), []).append(r)
    keys = sorted({(n, s) for n, s, _ in by_curve})
    for network, sae_seed in keys:
        cells = []
        for expansion in expansions:
            points = by_curve.get((network, sae_seed, expansion), [])
            l0 = np.array([metric_value(p["metrics"], "l0") for p in points])
            draws = [
                image_draws(
                    metric_value(p["metrics"], metric),
                    [metric_value(h, metric) for h in p.get("halves", [])],
                )
                for p in points
            ]
            n_draws = min((len(d) for d in draws), default=1)
            draws_pj = np.array([d[:n_draws] for d in draws]).reshape(len(points), n_draws)
            cells.append(
                np.stack(
                    [interpolate_at(l0, draws_pj[:, j], np.array(targets)) for j in range(n_draws)]
                )
            )
        n_draws = min(c.shape[0] for c in cells)
        out[(network, sae_seed)] = np.concatenate([c[:n_draws] for c in cells], axis=1)
    return out


def stack_kind(
    curves: dict[tuple[str, int], np.ndarray], networks: list[str], sae_seeds: list[int]
) -> np.ndarray:
    """``[units, seeds, draws, cells]`` in the given order; missing entries are NaN."""
    shape = next(iter(curves.values())).shape
    out = np.full((len(networks), len(sae_seeds), *shape), np.nan)
    for u, network in enumerate(networks):
        for s, seed in enumerate(sae_seeds):
            if (network, seed) in curves and curves[(network, seed)].shape == shape:
                out[u, s] = curves[(network, seed)]
    return out


def common_cells(*arrays: np.ndarray) -> np.ndarray:
    """Cells finite for every unit, seed and draw of every array: compared on both sides."""
    ok = np.ones(arrays[0].shape[-1], bool)
    for a in arrays:
        ok &= np.isfinite(a).all(axis=(0, 1, 2))
    return ok


# ---- the study's comparison: every metric, per layer position ----------------------


def _networks(units: list[plan_mod.Unit], role: str) -> list[str]:
    seen: list[str] = []
    for u in units:
        if u.role == role and u.network not in seen:
            seen.append(u.network)
    return seen


def _is_paired(study: StudyConfig, units: list[plan_mod.Unit]) -> bool:
    """Paired when both kinds have one backbone config each and the same backbone seeds:
    unit i of one kind shares its seed (initialisation, batch order) with unit i of the other."""
    base, treat = study.baseline, study.treatment
    return (
        base.seeds is not None
        and list(base.seeds) == list(treat.seeds or [])
        and len(base.backbones) == len(treat.backbones) == 1
    )


def _step1_array(
    records: dict[str, dict],
    networks: list[str],
    pos: int,
    metric: str,
    units: list[plan_mod.Unit],
    where: str = "metrics",
) -> np.ndarray:
    """``[units, 1, 1 + image draws, 1]`` for step-1 metrics (no SAE seeds, one cell)."""
    rows = []
    for network in networks:
        unit = next(u for u in units if u.network == network and u.layer_pos == pos)
        rec = records[unit.name]
        if where == "joint":
            joint = rec.get("joint") or {}
            rows.append(np.array([metric_value(joint.get("metrics", {}), metric)]))
        else:
            rows.append(
                image_draws(
                    metric_value(rec["metrics"], metric),
                    [metric_value(h, metric) for h in rec["halves"]],
                )
            )
    n = min(len(r) for r in rows)
    return np.array([r[:n] for r in rows])[:, None, :, None]


def _effect_or_none(
    metric: str, base: np.ndarray, treat: np.ndarray, paired: bool, study: StudyConfig
) -> dict[str, Any] | None:
    if (
        base.size == 0
        or treat.size == 0
        or not (np.isfinite(base).all() and np.isfinite(treat).all())
    ):
        return None
    if base.shape[2] != treat.shape[2]:
        n = min(base.shape[2], treat.shape[2])
        base, treat = base[:, :, :n], treat[:, :, :n]
    return compare_kinds(
        metric, base, treat, paired, study.n_boot, study.ci, study.boot_seed
    ).to_dict()


def identical_towers(step1_records: dict[str, dict], units: list[plan_mod.Unit]) -> list[str]:
    """Pairs (baseline network, treatment network) whose image towers share weights."""
    from hsae.backbones.base import same_image_tower_warning

    prints = {}
    for u in units:
        fp = step1_records[u.name].get("fingerprint")
        if fp:
            prints[f"{u.kind}:{u.network}"] = fp
    by_fp: dict[str, set[str]] = {}
    for name, fp in prints.items():
        by_fp.setdefault(fp, set()).add(name.split(":", 1)[0])
    shared = {fp for fp, kinds in by_fp.items() if len(kinds) > 1}
    warning = same_image_tower_warning({n: fp for n, fp in prints.items() if fp in shared})
    return [warning] if warning else []


def compare_study(
    study: StudyConfig,
    units: list[plan_mod.Unit],
    step1_records: dict[str, dict],
    sae_records: list[dict[str, Any]],
) -> dict[str, Any]:
    paired = _is_paired(study, units)
    base_nets, treat_nets = _networks(units, "baseline"), _networks(units, "treatment")
    towers = identical_towers(step1_records, units)
    targets = plan_mod.l0_targets(study)
    positions = sorted({u.layer_pos for u in units})
    layers_out = []
    for pos in positions:
        layer_of = {u.kind: u.backbone["layer"] for u in units if u.layer_pos == pos}
        entry: dict[str, Any] = {
            "layer_pos": pos,
            "layers": layer_of,
            "step1": {},
            "joint": {},
            "families": {},
            "per_l0": {},
        }
        for metric in (Metric(study.step1_metric, +1), *STEP1_SECONDARY):
            base = _step1_array(step1_records, base_nets, pos, metric.key, units)
            treat = _step1_array(step1_records, treat_nets, pos, metric.key, units)
            effect = _effect_or_none(metric.key, base, treat, paired, study)
            chance = None
            if effect is None and metric.key in STEP1_CHANCE and not np.isfinite(base).any():
                # The baseline kind cannot have this score (a ViT has no segment tree): the
                # treatment is read against the score's chance level instead.
                chance = STEP1_CHANCE[metric.key]
                base = np.full((treat.shape[0], 1, treat.shape[2], 1), chance)
                effect = _effect_or_none(metric.key, base, treat, False, study)
            entry["step1"][metric.key] = {
                "better": metric.better,
                "effect": effect,
                "call": call(_as_effect(effect), metric.better),
                "against_chance": chance,
            }
        if study.joint_dataset is not None:
            for metric in JOINT_METRICS:
                base = _step1_array(step1_records, base_nets, pos, metric.key, units, "joint")
                treat = _step1_array(step1_records, treat_nets, pos, metric.key, units, "joint")
                effect = _effect_or_none(metric.key, base, treat, paired, study)
                entry["joint"][metric.key] = {
                    "better": metric.better,
                    "effect": effect,
                    "call": call(_as_effect(effect), metric.better),
                }
        for family in FAMILIES:
            fam: dict[str, Any] = {"title": family.title, "metrics": {}}
            for metric in (family.primary, *family.secondary):
                curves = sae_curves(sae_records, metric.key, pos, list(study.expansions), targets)
                if not curves:
                    continue
                base = stack_kind(curves, base_nets, list(study.sae_seeds))
                treat = stack_kind(curves, treat_nets, list(study.sae_seeds))
                n_draws = min(base.shape[2], treat.shape[2])
                base, treat = base[:, :, :n_draws], treat[:, :, :n_draws]
                keep = common_cells(base, treat)
                cells = [(e, t) for e in study.expansions for t in targets]
                effect = _effect_or_none(
                    metric.key, base[..., keep], treat[..., keep], paired, study
                )
                fam["metrics"][metric.key] = {
                    "better": metric.better,
                    "effect": effect,
                    "call": call(_as_effect(effect), metric.better),
                    "cells": [
                        {"expansion": e, "l0": t}
                        for (e, t), k in zip(cells, keep, strict=True)
                        if k
                    ],
                    "dropped_cells": [
                        {"expansion": e, "l0": t}
                        for (e, t), k in zip(cells, keep, strict=True)
                        if not k
                    ],
                }
                if metric == family.primary:
                    per_l0 = []
                    for t_i, target in enumerate(targets):
                        cols = np.array(
                            [c == t_i for _ in study.expansions for c in range(len(targets))]
                        )
                        cols &= keep
                        eff = _effect_or_none(
                            metric.key, base[..., cols], treat[..., cols], paired, study
                        )
                        if eff is not None:
                            per_l0.append({"l0": target, **eff})
                    entry["per_l0"][metric.key] = per_l0
            entry["families"][family.key] = fam
        layers_out.append(entry)
    return {
        "paired": paired,
        "identical_towers": towers,
        "l0_targets": targets,
        "layers": layers_out,
    }


def _as_effect(effect: dict[str, Any] | None):
    if effect is None:
        return None
    return Effect(**{**effect, "n_units": tuple(effect["n_units"])})
