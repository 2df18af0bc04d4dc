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
