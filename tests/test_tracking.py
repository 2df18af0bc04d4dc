"""W&B may fail; training may not."""

import logging

import pytest
from lightning.pytorch.loggers import CSVLogger

from hsae import tracking
from hsae.config import LoggerConfig


def test_wandb_that_cannot_start_falls_back_to_csv(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(tracking, "WandbLogger", broken)
    with caplog.at_level(logging.WARNING):
        logger = tracking.make_logger(LoggerConfig(), tmp_path, {}, "run", [])
    assert isinstance(logger, CSVLogger)
    assert "W&B could not start" in caplog.text and "unreachable" in caplog.text


def test_wandb_guard_turns_errors_into_warnings(caplog):
    with caplog.at_level(logging.WARNING), tracking.wandb_guard("upload"):
        raise RuntimeError("quota exceeded")
    assert "could not upload" in caplog.text and "quota exceeded" in caplog.text


@pytest.mark.parametrize(
    "requested,env,key,expected",
    [
        ("online", None, None, "online"),
        (None, "offline", "secret", "offline"),
        (None, None, "secret", "online"),
        (None, None, None, "offline"),
    ],
)
def test_mode_is_offline_without_credentials(monkeypatch, tmp_path, requested, env, key, expected):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    assert tracking.wandb_mode(requested) == expected
