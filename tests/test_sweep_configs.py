"""Sweeps expand to the jobs a user expects, and every job's config is valid (no launches)."""

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from hsae.config import RunConfig, to_objects


def expand(*args: str) -> list[list[str]]:
    overrides = OverridesParser.create().parse_overrides(list(args))
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return batch


def test_the_study_command_works_as_typed(compose):
    command = [
        "backbone=clip_vit_b32,reclip_vit_b32",
        "backbone.layer=6,9,11",
        "sae=topk",
        "sae.expansion=8,16,32",
        "sae.k=16,32",
    ]
    jobs = expand(*command)
    assert len(jobs) == 2 * 3 * 3 * 2
    seen = set()
    for job in jobs:
        run = to_objects(compose(job), RunConfig)
        assert run.sae.n_latents == run.backbone.d_model * run.sae.expansion
        seen.add((run.backbone.name, run.backbone.loader, run.backbone.layer))
    assert ("reclip_vit_b32", "hf", 11) in seen and ("clip_vit_b32", "open_clip", 6) in seen


@pytest.mark.parametrize(
    "sweep,n_jobs,extra",
    [
        ("demo", 4, []),
        ("saebench", 18, ["backbone=clip_vit_b32", "backbone.layer=8"]),
        ("layers", 4, []),
        ("layers_vit12", 6, ["backbone=clip_vit_b16"]),
        ("layers_vit24", 6, ["backbone=clip_vit_l14"]),
    ],
)
def test_sweep_files_expand_to_valid_jobs(compose, sweep, n_jobs, extra):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        full = hydra_compose("train", [f"sweep={sweep}", *extra], return_hydra_config=True)
    assert full.hydra.mode.name == "MULTIRUN"
    params = [f"{k}={v}" for k, v in full.hydra.sweeper.params.items()]
    jobs = expand(*params)
    assert len(jobs) == n_jobs
    for job in jobs:
        run = to_objects(compose([f"sweep={sweep}", *extra, *job]), RunConfig)
        assert run.logger.group
        assert run.backbone.layer >= 0


def test_packed_saebench_is_one_job_with_a_bank_of_18(compose):
    run = to_objects(compose(["sweep=saebench_packed", "backbone=clip_vit_b32"]), RunConfig)
    assert run.bank is not None and len(run.bank) == 18
    assert {entry["n_latents"] for entry in run.bank} == {4096, 16384, 65536}
