"""SAE banks: several SAEs trained in one pass, each ending as if trained alone."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsae.errors import HsaeError
from tests.conftest import ROOT
from tests.test_cli import assert_one_line_error
from tests.wandb_offline import read_run

pytestmark = pytest.mark.slow

# Two widths, three architectures, a per-member lr; the Matryoshka members draw random
# prefix lengths, so they also check that members never consume each other's random numbers.
BANK = "bank=[{k:8},{arch:relu,l1_coeff:5,expansion:4},{arch:matryoshka,n_random_prefixes:2,k:8},{arch:matryoshka,n_random_prefixes:2,k:4,lr:0.002}]"
# The same configs as single runs.
SINGLES = [
    ["sae.k=8"],
    ["sae=relu", "sae.l1_coeff=5", "sae.expansion=4"],
    ["sae=matryoshka", "sae.n_random_prefixes=2", "sae.k=8"],
    ["sae=matryoshka", "sae.n_random_prefixes=2", "sae.k=4", "optim.lr=0.002"],
]
MEMBER_DIRS = [
    "0_k-8",
    "1_arch-relu_l1_coeff-5_expansion-4",
    "2_arch-matryoshka_n_random_prefixes-2_k-8",
    "3_arch-matryoshka_n_random_prefixes-2_k-4_lr-0.002",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bank_cache")


@pytest.fixture(scope="module")
def train_in_process(compose, cache_dir):
    from hsae.training.run import train

    def _train(run_dir: Path, *overrides: str):
        cfg = compose(["experiment=smoke", "logger=csv", f"cache.dir={cache_dir}", *overrides])
        return train(cfg, run_dir)

    return _train


@pytest.fixture(scope="module")
def bank_job(tmp_path_factory, train_in_process):
    job_dir = tmp_path_factory.mktemp("bank") / "job"
    return job_dir, train_in_process(job_dir, BANK)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "sae.safetensors")


def test_members_equal_the_same_configs_trained_alone(bank_job, train_in_process, tmp_path):
    job_dir, bank_metrics = bank_job
    assert [p.name for p in sorted((job_dir / "bank").iterdir())] == MEMBER_DIRS
    assert len(bank_metrics) == 4
    for i, overrides in enumerate(SINGLES):
        single_metrics = train_in_process(tmp_path / f"single{i}", *overrides)
        member_dir = job_dir / "bank" / MEMBER_DIRS[i]
        assert bank_metrics[i] == single_metrics, overrides
        assert json.loads((member_dir / "metrics.json").read_text()) == single_metrics
        alone, member = weights(tmp_path / f"single{i}"), weights(member_dir)
        assert alone.keys() == member.keys()
        for key in alone:
            torch.testing.assert_close(member[key], alone[key], rtol=0, atol=0, msg=key)
        # The member's config is the single run's: compare tables line them up.
        member_cfg = json.loads((member_dir / "cfg.json").read_text())
        single_cfg = json.loads((tmp_path / f"single{i}" / "cfg.json").read_text())
        assert member_cfg["config"] == single_cfg["config"]
        assert member_cfg["sae"] == single_cfg["sae"]
    widths = {json.loads((job_dir / "bank" / d / "cfg.json").read_text())["sae"]["n_latents"]
              for d in MEMBER_DIRS}  # fmt: skip
    assert widths == {512, 1024}


def test_bank_json_and_skip_finished(bank_job, train_in_process, caplog):
    job_dir, bank_metrics = bank_job
    listing = json.loads((job_dir / "bank.json").read_text())["members"]
    assert [m["dir"] for m in listing] == [f"bank/{d}" for d in MEMBER_DIRS]
    assert [m["metrics"] for m in listing] == bank_metrics
    assert listing[3]["lr"] == 0.002 and listing[3]["label"] == (
        "arch=matryoshka,n_random_prefixes=2,k=4,lr=0.002"
    )
    with caplog.at_level("INFO"):
        again = train_in_process(job_dir, BANK)
    assert "skipping" in caplog.text
    assert again == bank_metrics


def test_killed_bank_resumes_to_the_same_weights(bank_job, train_in_process, tmp_path, monkeypatch):
    from hsae.training.module import SAEModule

    job_dir, _ = bank_job
    step = SAEModule.training_step

    def crash_in_second_epoch(self, batch, batch_idx):
        if self.global_step == 5:  # after the end-of-epoch-0 checkpoint (4 steps per epoch)
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    killed = tmp_path / "killed"
    monkeypatch.setattr(SAEModule, "training_step", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="killed"):
        train_in_process(killed, BANK)
    monkeypatch.setattr(SAEModule, "training_step", step)
    assert (killed / "checkpoints" / "last.ckpt").exists()
    assert not (killed / "bank").exists()

    with pytest.raises(HsaeError, match="checkpoint of a bank with another config"):
        train_in_process(killed, "bank=[{k:8},{k:4}]")
    train_in_process(killed, BANK)
    for name in MEMBER_DIRS:
        whole, resumed = weights(job_dir / "bank" / name), weights(killed / "bank" / name)
        for key in whole:
            torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)


def test_nan_in_one_member_names_it_and_saves_nothing(train_in_process, tmp_path):
    with pytest.raises(HsaeError) as error:
        train_in_process(tmp_path / "nan", "bank=[{k:8},{k:8,lr:1e30}]", "optim.warmup_steps=1")
    message = str(error.value)
    assert "bank member 1_k-8_lr-1e+30" in message and "at step" in message, message
    assert not (tmp_path / "nan" / "bank").exists()


@pytest.mark.parametrize(
    "entry,words",
    [
        ("{k:8,kk:3}", ["bank[1]", "kk", "Valid keys", "n_latents", "lr"]),
        ("{k:5000}", ["bank[1]", "sae.k=5000", "1..1024"]),
        ("{arch:nope}", ["bank[1]", "sae.arch='nope'", "topk"]),
    ],
)
def test_bad_entry_fails_before_any_work(train_in_process, tmp_path, cache_dir, entry, words):
    with pytest.raises(HsaeError) as error:
        train_in_process(tmp_path / "bad", f"bank=[{{k:4}},{entry}]")
    for word in words:
        assert word in str(error.value), str(error.value)
    assert not (tmp_path / "bad" / "bank.json").exists()


def test_packed_saebench_sweep_is_the_saebench_grid(compose, tmp_path):
    from omegaconf import OmegaConf

    from hsae.config import RunConfig, to_objects
    from hsae.training.bank import make_members

    cfg_dict = compose(["sweep=saebench_packed"])
    cfg = to_objects(cfg_dict, RunConfig)
    members = make_members(cfg, OmegaConf.to_container(cfg_dict, resolve=True), tmp_path)
    grid = OmegaConf.load(ROOT / "conf" / "sweep" / "saebench.yaml").hydra.sweeper.params
    widths = [int(w) for w in grid["sae.n_latents"].split(",")]
    ks = [int(k) for k in grid["sae.k"].split(",")]
    assert sorted((m.sae.n_latents, m.sae.k) for m in members) == sorted(
        (w, k) for w in widths for k in ks
    )
    assert {m.sae.arch for m in members} == {"topk"}


def run(script: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_bank_with_wandb_then_evaluate_and_compare(tmp_path, cache_dir, compose):
    job_dir = tmp_path / "job"
    result = run(
        "train.py",
        "experiment=smoke",  # W&B logger, offline in tests
        "bank=[{k:8},{k:4,expansion:4},{arch:relu,l1_coeff:5}]",
        f"hydra.run.dir={job_dir}",
        f"cache.dir={cache_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = sorted((job_dir / "bank").iterdir())
    assert [d.name for d in dirs] == ["0_k-8", "1_k-4_expansion-4", "2_arch-relu_l1_coeff-5"]
    for member_dir, k, n_latents in zip(dirs, (8, 4, 16), (1024, 512, 1024), strict=True):
        for name in ("sae.safetensors", "cfg.json", "metrics.json"):
            assert (member_dir / name).exists(), member_dir / name
        wandb_run = read_run(member_dir)  # exactly one offline run in the member's dir
        metrics = json.loads((member_dir / "metrics.json").read_text())
        assert wandb_run["config"]["sae.k"] == k
        assert wandb_run["config"]["sae.n_latents"] == n_latents
        assert wandb_run["summary"]["fvu"] == pytest.approx(metrics["fvu"])
        assert {"train/loss", "train/l0", "lr", "val/fvu"} <= wandb_run["history_keys"]
        assert "latents/table/nrows" in wandb_run["history_keys"]
        assert wandb_run["job_type"] == "train" and wandb_run["group"]
        assert ("sae", f"sae-{wandb_run['name']}".replace("=", "_").replace(",", "_")) in (
            wandb_run["artifacts"]
        )
    assert read_run(dirs[2])["config"]["sae.arch"] == "relu"
    assert not (job_dir / "wandb").exists(), "the job itself logs to CSV, not to a W&B run"

    # evaluate.py's main on the overrides as typed (Hydra parses the member's path unquoted),
    # in this process: a subprocess would spend most of its time importing.
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    member = dirs[1]
    evaluate.main(compose([f"run_dir={member}"], config_name="evaluate"))
    trained = json.loads((member / "metrics.json").read_text())
    assert json.loads((member / "eval.json").read_text())["metrics"]["fvu"] == pytest.approx(
        trained["fvu"], rel=1e-4
    )
    evaluate.main(compose([f"compare={job_dir}"], config_name="evaluate"))
    table = (job_dir / "compare" / "runs.md").read_text().splitlines()[2:]
    assert len([line for line in table if line.strip()]) == 3


def test_cli_bad_entry_is_a_one_line_error(tmp_path, cache_dir):
    result = run(
        "train.py",
        "experiment=smoke",
        "logger=csv",
        "bank=[{k:8},{width:3}]",
        f"hydra.run.dir={tmp_path / 'job'}",
        f"cache.dir={cache_dir}",
    )
    assert_one_line_error(result, "bank[1]", "width", "Valid keys")
