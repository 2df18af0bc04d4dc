"""The CAST experiment configs compose into studies of the controlled pairs."""

from __future__ import annotations

import pytest

from hsae.config import RunConfig, to_objects


@pytest.mark.parametrize(
    ("experiment", "kinds"),
    [
        ("cast_pairs_stand_in", {"vit": "stand_in_flat", "cast": "stand_in_cast"}),
        ("cast_pairs_moco", {"vit_s_moco": "vit_s_moco", "cast_s_moco": "cast_s_moco"}),
        ("cast_pairs_deit", {"deit_s": "deit_s", "cast_s_deit": "cast_s_deit"}),
    ],
)
def test_cast_pair_experiments_compose(compose, experiment, kinds):
    from hsae.study.plan import make_units

    study = to_objects(compose([f"experiment={experiment}"]), RunConfig).study
    assert study.baseline.role == "baseline"
    units = make_units(study)
    assert {u.kind: u.config for u in units} == kinds
    treatment = [u for u in units if u.role == "treatment"]
    assert all(u.config.startswith(("cast", "stand_in_cast")) for u in treatment)
    if experiment == "cast_pairs_stand_in":  # one recipe, one objective: only the arch differs
        vit, cast = (next(u.backbone for u in units if u.kind == k) for k in ("vit", "cast"))
        assert (vit["model_name"], cast["model_name"]) == ("vit", "cast")
        assert vit["pretrained"] == cast["pretrained"] == "flat"
        assert vit["recipe"] == cast["recipe"]
