"""The run dir: its file names in one place, the one atomic writer and the one sha256.

A run dir (``hydra.run.dir``) holds what ``train.py`` and ``evaluate.py`` write::

    sae.safetensors        the SAE (hsae.sae.save_sae)
    cfg.json               what the run was: sae, cache paths, backbone, dataset, seed, config
    metrics.json           training's final metrics; written last, so it marks the run finished
    eval.json              step 3 (hsae.evaluation.evaluate_run)
    bank.json              the bank being trained (a bank run)
    bank/<name>/           one run dir per bank member
    checkpoints/last.ckpt  Lightning's checkpoint to resume from
    browser/               the feature browser

This module imports only the standard library, so light readers (compare, the study's
report) do not pull torch in. Every artifact is written through ``write_atomic``: a
temporary name, fsync of the file, rename, fsync of the folder (the rename survives a
power cut too).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

WEIGHTS = "sae.safetensors"
CFG = "cfg.json"
METRICS = "metrics.json"
EVAL = "eval.json"
BANK = "bank.json"
BANK_DIR = "bank"
LAST_CKPT = "checkpoints/last.ckpt"
BROWSER = "browser"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run dir's files (nothing is read until asked)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def cfg(self) -> Path:
        return self.path / CFG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def eval(self) -> Path:
        return self.path / EVAL

    @property
    def bank(self) -> Path:
        return self.path / BANK

    @property
    def last_ckpt(self) -> Path:
        return self.path / LAST_CKPT

    @property
    def browser(self) -> Path:
        return self.path / BROWSER

    def finished(self) -> bool:
        """``metrics.json`` is written last: with ``cfg.json`` it marks a finished run."""
        return self.metrics.exists() and self.cfg.exists()

    def read_cfg(self) -> dict[str, Any]:
        return read_json(self.cfg)

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics)

    def read_eval(self) -> dict[str, Any]:
        return read_json(self.eval)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class _HashingWriter:
    """A file wrapper that hashes what is written, so a file is not read again to hash it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_path(path: Path) -> Path:
    """The temporary name beside ``path`` that ``write_atomic`` renames from."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_atomic(tmp: Path, path: Path) -> None:
    """Make a fully written ``tmp`` the file ``path``: fsync it, rename, fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself survives a power cut


def write_atomic(path: str | Path, data: bytes | str | Callable[[Any], Any]) -> str:
    """Write ``data`` (bytes, text, or a ``write(file)`` callback) to ``path`` atomically;
    returns its sha256 (hex)."""
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        if callable(data):
            data(writer)
        else:
            writer.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return writer.digest.hexdigest()


def write_json(
    path: str | Path,
    obj: Any,
    trailing_newline: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """``obj`` as indented JSON, atomically (``default``: as ``json.dumps``')."""
    text = json.dumps(obj, indent=2, default=default)
    write_atomic(path, text + ("\n" if trailing_newline else ""))


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    """The sha256 (hex) of a file, read in blocks (shards and weights can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
