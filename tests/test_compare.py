"""Comparison logic on rows built in the test (no training): seeds pooled with CIs, Pareto
fronts, the same-image-tower warning, and W&B groups as a source."""

import math
from types import SimpleNamespace

import pytest

from hsae.compare import collect_wandb_runs, pareto_front, pool_seeds, same_image_tower, t95
from hsae.errors import HsaeError


def test_seeds_pool_into_mean_and_t_interval():
    rows = [{"sae.k": 8, "seed": s, "fvu": v} for s, v in enumerate([0.2, 0.3, 0.4])]
    rows.append({"sae.k": 16, "seed": 0, "fvu": 0.1})
    pooled = {r["sae.k"]: r for r in pool_seeds(rows, ["fvu"])}
    assert pooled[8]["n_seeds"] == 3 and pooled[8]["fvu"] == pytest.approx(0.3)
    assert pooled[8]["fvu_ci95"] == pytest.approx(t95(2) * 0.1 / math.sqrt(3))
    assert pooled[16]["n_seeds"] == 1 and "fvu_ci95" not in pooled[16]


def test_pareto_front_keeps_only_undominated_points():
    points = [(8, 0.6), (16, 0.4), (16, 0.5), (32, 0.45), (64, 0.2)]
    assert pareto_front(points) == [(8, 0.6), (16, 0.4), (64, 0.2)]


def test_identical_image_towers_are_named():
    rows = [
        {"backbone.name": "clip_vit_b32", "backbone.fingerprint": "abc"},
        {"backbone.name": "reclip_vit_b32", "backbone.fingerprint": "abc"},
        {"backbone.name": "dinov2_vit_b14", "backbone.fingerprint": "def"},
    ]
    (warning,) = same_image_tower(rows)
    assert "clip_vit_b32" in warning and "reclip_vit_b32" in warning and "dinov2" not in warning
    assert same_image_tower(rows[1:]) == []


class FakeApi:
    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters):
        self.calls.append((path, filters))
        return self._runs


def test_wandb_group_rows_use_the_logged_names():
    run = SimpleNamespace(
        id="r1", state="finished",
        config={"backbone.name": "tiny_vit", "sae.k": 8, "logger.project": "hsae"},
        summary={"fvu": 0.3, "l0": 8.0, "_runtime": 4, "train/loss": 0.5, "interp/ms": 0.4},
    )  # fmt: skip
    crashed = SimpleNamespace(id="r2", state="crashed", config={}, summary={})
    api = FakeApi([run, crashed])
    rows, metrics = collect_wandb_runs("me/hsae/sweep1", api=api)
    assert api.calls == [("me/hsae", {"group": "sweep1", "jobType": "train"})]
    assert len(rows) == 1 and rows[0]["sae.k"] == 8 and "logger.project" not in rows[0]
    assert metrics == ["fvu", "interp/ms", "l0"]
    with pytest.raises(HsaeError, match="entity"):
        collect_wandb_runs("hsae/sweep1", api=api)


def test_tables_sort_numbers_as_numbers(tmp_path):
    from hsae.compare import write_tables

    rows = [{"sae.k": k, "fvu": 1.0 / k} for k in (16, 4, 8, 128)]
    md_path, csv_path = write_tables(rows, ["fvu"], tmp_path)
    md_ks = [line.split("|")[1].strip() for line in md_path.read_text().splitlines()[2:]]
    assert md_ks == ["4", "8", "16", "128"]
    csv_ks = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    assert csv_ks == ["4", "8", "16", "128"]


def test_mixed_and_missing_values_sort_without_error(tmp_path):
    from hsae.compare import write_tables

    rows = [{"sae.arch": a, "sae.k": k, "fvu": 0.1} for a, k in
            [("topk", 8), ("relu", None), ("topk", 4), ("batchtopk", 16)]]  # fmt: skip
    md_path, _ = write_tables(rows, ["fvu"], tmp_path)
    cells = [
        [c.strip() for c in line.split("|")[1:3]] for line in md_path.read_text().splitlines()[2:]
    ]
    assert cells == [["batchtopk", "16"], ["relu", ""], ["topk", "4"], ["topk", "8"]]


def test_log_axes_have_plain_tick_labels_at_the_data(tmp_path):
    from hsae.compare import make_xy_figure

    rows = [{"sae.k": k, "fvu": 1.0 / k, "sae.arch": "topk"} for k in (16, 4, 8)]
    fig = make_xy_figure(rows, "sae.k", "fvu", ("sae.arch",))
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [
        t.get_text() for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
    ]
    shown = [label for label in labels if label]
    assert shown == ["4", "8", "16"], shown
    assert ax.get_xscale() == "log"


def test_measured_log_axes_get_plain_1_2_5_ticks(tmp_path):
    from hsae.compare import make_xy_figure

    rows = [{"l0": l0, "fvu": 1.0 / l0} for l0 in (1.7, 3.4, 6.7, 13.4, 27.0)]
    fig = make_xy_figure(rows, "l0", "fvu", ())
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels()
             if t.get_text() and lo <= t.get_position()[0] <= hi]  # fmt: skip
    assert shown == ["2", "5", "10", "20"], shown
