"""Training robustness: resume after a kill, NaN stops the run, reproducibility."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# 16 short epochs: long enough to kill mid-way, a few seconds in all.
LONG = ["experiment=smoke", "logger=csv", "dataset.n_train=1024", "optim.epochs=16"]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *overrides]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    cache = f"cache.dir={tmp_path / 'cache'}"
    whole = subprocess.run(
        train_cmd(*LONG, cache, f"hydra.run.dir={tmp_path / 'whole'}"),
        capture_output=True,
        text=True,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd(*LONG, cache, f"hydra.run.dir={run_dir}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    epoch = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"]
    assert epoch < 15

    resumed = subprocess.run(
        train_cmd(*LONG, cache, f"hydra.run.dir={run_dir}"), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    a, b = load_file(tmp_path / "whole" / "sae.safetensors"), load_file(run_dir / "sae.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        train_cmd(
            "experiment=smoke", "logger=csv", "optim.lr=1e30", "optim.warmup_steps=1",
            f"hydra.run.dir={run_dir}", f"cache.dir={tmp_path / 'cache'}",
        ),
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert (
        message.startswith("error: training loss is")
        and "at step" in message
        and "optim.lr" in message
    )
    assert not (run_dir / "sae.safetensors").exists()
    assert not (run_dir / "metrics.json").exists()


def test_cold_and_warm_cache_runs_are_identical(tmp_path):
    """Building the cache must not change the SAE's random initialisation."""
    cache = f"cache.dir={tmp_path / 'cache'}"
    for name in ("cold", "warm"):
        result = subprocess.run(
            train_cmd("experiment=smoke", "logger=csv", cache, f"hydra.run.dir={tmp_path / name}"),
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    cold = json.loads((tmp_path / "cold" / "metrics.json").read_text())
    warm = json.loads((tmp_path / "warm" / "metrics.json").read_text())
    assert cold == warm
