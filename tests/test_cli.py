"""The real entry points as a user runs them: train.py then evaluate.py, and user errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HIERARCAPS_IMAGES, ROOT, TINY


def run(script: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    run_dir = tmp / "run"
    result = run(
        "train.py",
        "experiment=smoke",  # W&B logger (offline here), tiny data
        f"hydra.run.dir={run_dir}",
        f"cache.dir={tmp / 'cache'}",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, result


@pytest.mark.slow
def test_train_writes_the_run_dir(trained_run):
    run_dir, result = trained_run
    for name in ("sae.safetensors", "cfg.json", "metrics.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) >= {
        "mse",
        "fvu",
        "l0",
        "dead_fraction",
        "l1",
        "dense_fraction",
        "shrinkage",
    }
    assert 0 < metrics["max_decoder_cosine"] <= 1
    assert 0 < metrics["fvu"] < 1
    assert metrics["l0"] == pytest.approx(16)
    cfg = json.loads((run_dir / "cfg.json").read_text())
    assert cfg["sae"]["arch"] == "topk" and cfg["sae"]["n_latents"] == 1024
    assert all((Path(p) / "manifest.json").exists() for p in cfg["cache"].values())
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert "wandb sync" in result.stdout + result.stderr


@pytest.mark.slow
def test_evaluate_recomputes_the_metrics(trained_run):
    run_dir, _ = trained_run
    result = run("evaluate.py", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fvu" in result.stdout
    evaluated = json.loads((run_dir / "eval.json").read_text())["metrics"]
    trained = json.loads((run_dir / "metrics.json").read_text())
    for name in ("fvu", "mse", "l0", "dead_fraction"):
        assert evaluated[name] == pytest.approx(trained[name], rel=1e-4, abs=1e-6), name
    assert not (ROOT / "outputs").exists(), "evaluate.py must not leave Hydra output dirs"
    for name in ("interp/purity@family", "interp/ms", "interp/uniqueness", "interp/sparse_probe@k1/shape",
                 "interp/absorption_rate", "fidelity/recovered@variant"):  # fmt: skip
        assert name in evaluated, name
    # Control and zero-shot are validated (planted vs random, perfect vs null SAE) in
    # tests/test_control.py; here: they ran, through the CLI, and gave numbers.
    for name in ("control/hit_rate@family", "fidelity/zero_shot/spliced@family"):
        assert math.isfinite(evaluated[name]), name  # tiny_vit has a text tower
    assert evaluated["control/n_latents"] >= 1
    skipped = json.loads((run_dir / "eval.json").read_text())["skipped"]
    assert "patch" in skipped["interp/moran_i"]  # CLS rows have no patch grid
    from tests.wandb_offline import read_run

    eval_run = read_run(run_dir / "eval")  # a W&B run of its own, beside the training run's
    assert eval_run["job_type"] == "eval" and eval_run["name"].endswith("/eval")
    assert eval_run["summary"]["interp/purity@family"] == pytest.approx(
        evaluated["interp/purity@family"]
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]


@pytest.mark.slow
def test_evaluate_missing_run_dir(tmp_path):
    assert_one_line_error(run("evaluate.py", f"run_dir={tmp_path / 'nope'}"), "does not exist")


@pytest.mark.slow
def test_evaluate_run_dir_without_weights(tmp_path):
    assert_one_line_error(run("evaluate.py", f"run_dir={tmp_path}"), "sae.safetensors")


def damaged_run_dir(tmp_path: Path) -> Path:
    """A run dir with a readable cfg.json and a sae.safetensors cut in half."""
    from hsae.sae import TopKSAE, save_sae

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    weights = save_sae(TopKSAE(d_model=8, n_latents=16, k=2), run_dir)
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = {"sae": {}, "cache": {"val": str(tmp_path / "cache")}, "backbone": {}, "dataset": {}}
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    return run_dir


@pytest.mark.slow
def test_evaluate_damaged_weights_and_cfg_are_one_line_errors(tmp_path):
    run_dir = damaged_run_dir(tmp_path)
    result = run("evaluate.py", f"run_dir={run_dir}")
    assert_one_line_error(result, "sae.safetensors", "truncated or damaged", "train.py")
    cfg = json.loads((run_dir / "cfg.json").read_text())
    del cfg["cache"]
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    assert_one_line_error(run("evaluate.py", f"run_dir={run_dir}"), "cfg.json", "'cache'")


@pytest.mark.slow
def test_train_resuming_from_a_damaged_checkpoint_is_one_line_error(tmp_path):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint" * 8)
    result = run(
        "train.py", *TINY, "dataset.n_train=64", "dataset.n_val=32",
        f"hydra.run.dir={tmp_path}/r", f"cache.dir={tmp_path}/c",
    )  # fmt: skip
    assert_one_line_error(result, "last.ckpt", "delete it")


@pytest.mark.slow
def test_train_layer_out_of_range(tmp_path):
    result = run(
        "train.py",
        *TINY,
        "backbone.layer=12",
        f"hydra.run.dir={tmp_path}/r",
        f"cache.dir={tmp_path}/c",
    )
    assert_one_line_error(result, "backbone.layer=12", "0..3")


@pytest.mark.slow
def test_unknown_config_choice_lists_valid_ones():
    result = run("train.py", "backbone=not_a_backbone")
    assert result.returncode != 0
    assert "Available options in 'backbone'" in result.stderr
    assert "tiny_vit" in result.stderr


@pytest.mark.slow
def test_offline_wandb_run_has_flat_config_and_summary_keys(trained_run):
    from tests.wandb_offline import read_run

    run_dir, _ = trained_run
    run = read_run(run_dir)
    for key in (
        "backbone.name",
        "backbone.layer",
        "sae.arch",
        "sae.n_latents",
        "sae.k",
        "sae.lr",
        "dataset.name",
    ):
        assert key in run["config"], key
    assert run["config"]["backbone.layer"] == 2
    for key in ("fvu", "mse", "l0", "dead_fraction"):
        assert key in run["summary"], key
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run["summary"]["fvu"] == pytest.approx(metrics["fvu"])
    assert {"tiny_vit", "topk", "layer2"} <= set(run["tags"])
    assert run["job_type"] == "train"
    assert {"train/loss", "val/fvu"} <= run["history_keys"]
    assert "latents/top_images/count" in run["history_keys"]
    assert "latents/table/nrows" in run["history_keys"]
    assert ("sae", f"sae-{run['name']}") in run["artifacts"]
    assert sum(kind == "activation-cache" for kind, _ in run["artifacts"]) == 2


@pytest.mark.slow
def test_patch_tokens_get_moran_i(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        "train.py", *TINY, "backbone.tokens=patch", "dataset.n_train=64", "dataset.n_val=48",
        "optim.batch_size=256", f"hydra.run.dir={run_dir}", f"cache.dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("evaluate.py", f"run_dir={run_dir}", "n_top=10")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert evaluated["metrics"]["n_rows"] == 48 * 64
    assert -1 <= evaluated["metrics"]["interp/moran_i"] <= 1
    assert "interp/moran_i" not in evaluated["skipped"]


@pytest.mark.slow
def test_step1_hierarchy_of_a_backbone_layer(tmp_path):
    result = run(
        "evaluate.py", "backbone=tiny_vit", "layer=1", "dataset.n_val=300",
        f"cache.dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'hier'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "hier").glob("tiny_vit_l1_cls_synthetic-val.json")
    record = json.loads(path.read_text())
    for name in (
        "hier/cpcc",
        "hier/probe_acc@family",
        "hier/consistency",
        "hier/mistake_severity",
        "hier/ami@shape",
    ):
        assert name in record["metrics"], name
    assert record["backbone"]["layer"] == 1


@pytest.mark.slow
def test_train_on_own_activations_and_export_for_saelens(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(1200, 24)) @ rng.normal(size=(24, 24))).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    run_dir = tmp_path / "run"
    result = run(
        "train.py", *TINY, "dataset=activations", f"dataset.path={tmp_path / 'acts.npy'}",
        "backbone.d_model=24", "sae.k=4", f"hydra.run.dir={run_dir}", f"cache.dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 < json.loads((run_dir / "metrics.json").read_text())["fvu"] < 1
    result = run(
        "evaluate.py",
        f"run_dir={run_dir}",
        f"export_saelens={tmp_path / 'saelens'}",
        "interp=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exported = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert exported["architecture"] == "topk" and exported["d_in"] == 24 and exported["k"] == 4

    wrong = run(
        "train.py", *TINY, "dataset=activations", f"dataset.path={tmp_path / 'acts.npy'}",
        f"hydra.run.dir={tmp_path / 'wrong'}", f"cache.dir={tmp_path / 'cache'}",
    )  # fmt: skip
    assert_one_line_error(wrong, "backbone.d_model=24")


@pytest.mark.slow
def test_matryoshka_groups_get_their_own_taxonomy_depth(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        "train.py",
        *TINY,
        "sae=matryoshka",
        f"hydra.run.dir={run_dir}",
        f"cache.dir={tmp_path / 'c'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run("evaluate.py", f"run_dir={run_dir}", "n_top=10")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert sum(key.startswith("interp/taxonomy_depth/group") for key in metrics) == 5


@pytest.mark.slow
def test_step1_joint_space_on_hierarcaps(tmp_path):
    result = run(
        "evaluate.py", "backbone=tiny_vit", "dataset=hierarcaps",
        f"dataset.path={HIERARCAPS_IMAGES}", "dataset.max_images=30", f"out_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("tiny_vit_l2_cls_hierarcaps-val.json")
    metrics = json.loads(path.read_text())["metrics"]
    assert -1 <= metrics["hier/kendall_tau"] <= 1
    assert 0 <= metrics["hier/retrieval_precision"] <= 1
