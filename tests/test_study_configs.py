"""Every study config composes into typed configs, units and jobs (fast); a bad study fails
with a message naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hsae.config import RunConfig, to_objects
from hsae.errors import HsaeError
from hsae.study.config import KindConfig, StudyConfig
from hsae.study.plan import make_jobs, make_units

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted(p.stem for p in (ROOT / "conf" / "study").glob("*.yaml"))


def test_plain_train_is_one_job(compose):
    cfg = compose([])
    assert cfg.study is None


@pytest.mark.parametrize("name", STUDIES)
def test_study_configs_compose(compose, name, tmp_path):
    cfg = compose([f"study={name}"])
    run: RunConfig = to_objects(cfg, RunConfig)
    study = run.study
    assert study is not None and study.name == name
    assert {k.role for k in study.kinds} == {"baseline", "treatment"}
    units = make_units(study)  # composes each backbone config (its own Hydra context)
    jobs = make_jobs(cfg, study, units, tmp_path)
    assert len(jobs) == len(units) * len(study.sae_seeds)
    job = OmegaConf.to_container(jobs[0].cfg, resolve=True)
    assert job["study"] is None and len(job["bank"]) == len(study.expansions) * len(study.ks)
    # each job is an ordinary run config: it passes the schema, its SAE width from its backbone
    member = to_objects(OmegaConf.create(job), RunConfig)
    assert member.sae.n_latents == member.backbone.d_model * member.sae.expansion
    assert {u.kind for u in units} == {k.label for k in study.kinds}


def test_default_study_is_stand_ins_with_three_seeds(compose):
    study = to_objects(compose(["study=default"]), RunConfig).study
    for kind in study.kinds:
        assert len(kind.seeds) >= 3 and kind.backbones[0].startswith("stand_in_")
    assert compose(["study=default"]).dataset.name == "synthetic_tree"
    # dataset.* on the command line reaches the study's jobs
    assert compose(["study=default", "dataset.n_val=512"]).dataset.n_val == 512


def test_changed_config_lands_in_a_new_job_dir(compose, tmp_path):
    cfg = compose(["study=smoke"])
    study = to_objects(cfg, RunConfig).study
    units = make_units(study)
    a = make_jobs(cfg, study, units, tmp_path)
    b = make_jobs(compose(["study=smoke", "optim.epochs=3"]), study, units, tmp_path)
    c = make_jobs(compose(["study=smoke", "logger=wandb"]), study, units, tmp_path)
    assert a[0].run_dir != b[0].run_dir  # what it computes changed: never the stale dir
    assert a[0].run_dir == c[0].run_dir  # only how it is logged changed: the same run


def test_bad_studies_fail_with_the_fix():
    kinds = [
        KindConfig(label="a", role="baseline", backbones=["x"]),
        KindConfig(label="b", role="baseline", backbones=["y"]),
    ]
    with pytest.raises(HsaeError, match="one with role: baseline and one with role: treatment"):
        StudyConfig(name="s", kinds=kinds)
    with pytest.raises(HsaeError, match="lists no backbones"):
        KindConfig(label="a", backbones=[])
    good = [
        KindConfig(label="a", role="baseline", backbones=["x"]),
        KindConfig(label="b", role="treatment", backbones=["y"]),
    ]
    with pytest.raises(HsaeError, match="n_image_halves=3"):
        StudyConfig(name="s", kinds=good, n_image_halves=3)
    with pytest.raises(HsaeError, match="does not compose"):
        bad = [
            KindConfig(label="a", role="baseline", backbones=["no_such_backbone"]),
            KindConfig(label="b", role="treatment", backbones=["tiny_vit"]),
        ]
        make_units(StudyConfig(name="s", kinds=bad))
