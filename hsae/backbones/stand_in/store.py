"""Content-addressed store of trained stand-ins.

``${HSAE_HOME:-~/.cache/hsae}/stand_ins/<arch>-<objective>-s<seed>-<hash>/`` holds

- ``model.safetensors``: the encoder and heads (``StandIn`` state dict);
- ``train_config.json``: the key (format, architecture, objective, seed, recipe) the hash is
  taken over, plus the weights' sha256 and the library versions;
- ``metrics.json``: held-out accuracy per level, CPCC of the embedding, training seconds.

A folder is built once, under a file lock (concurrent jobs wait for the first), in a
temporary folder renamed into place, and reused afterwards. A folder whose files are missing,
unreadable, or disagree with its key or checksum is an error naming the folder (delete it to
rebuild), never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from hsae.backbones.stand_in.models import StandIn, make_stand_in
from hsae.backbones.stand_in.train import Recipe, train_stand_in
from hsae.data.synthetic_tree import HIERARCHY
from hsae.errors import HsaeError
from hsae.rundir import sha256_file

log = logging.getLogger(__name__)

# Bump when a change to the training code changes what a recipe produces, so that folders
# trained by older code are not reused under the same key.
STORE_FORMAT = 1
WEIGHTS, TRAIN_CONFIG, METRICS = "model.safetensors", "train_config.json", "metrics.json"


def stand_in_root() -> Path:
    return Path(os.environ.get("HSAE_HOME", "~/.cache/hsae")).expanduser() / "stand_ins"


def store_key(arch: str, objective: str, seed: int, recipe: Recipe) -> dict[str, Any]:
    return {
        "format": STORE_FORMAT,
        "arch": arch,
        "objective": objective,
        "seed": int(seed),
        "recipe": recipe.to_dict(),
    }


def store_path(arch: str, objective: str, seed: int, recipe: Recipe) -> Path:
    key = store_key(arch, objective, seed, recipe)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return stand_in_root() / f"{arch}-{objective}-s{seed}-{digest}"


def check_entry(path: Path, key: dict[str, Any]) -> dict[str, Any]:
    """The entry's train_config; raises if anything in the folder is missing or off."""
    fix = f"delete {path} to retrain it"
    missing = [f for f in (WEIGHTS, TRAIN_CONFIG, METRICS) if not (path / f).is_file()]
    if missing:
        raise HsaeError(f"stand-in store entry {path} is damaged: {missing} missing; {fix}")
    try:
        config = json.loads((path / TRAIN_CONFIG).read_text())
        json.loads((path / METRICS).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HsaeError(f"stand-in store entry {path} is damaged ({e}); {fix}") from e
    if config.get("key") != key:
        raise HsaeError(
            f"stand-in store entry {path} was trained with {config.get('key')}, not {key} "
            f"(stale or a hash collision); {fix}"
        )
    if sha256_file(path / WEIGHTS) != config.get("weights_sha256"):
        raise HsaeError(
            f"stand-in store entry {path}: {WEIGHTS} does not match its recorded checksum; {fix}"
        )
    return config


def ensure_stand_in(
    arch: str, objective: str, seed: int, recipe: Recipe | dict[str, Any] | None = None
) -> Path:
    """The store folder of this stand-in, trained first if it is not there yet."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe)
    key = store_key(arch, objective, seed, recipe)
    path = store_path(arch, objective, seed, recipe)
    if path.exists():
        check_entry(path, key)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock file stays (filelock's convention); hidden so listings show only stand-ins.
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if path.exists():  # another process built it while this one waited
            check_entry(path, key)
            return path
        log.info("stand-in %s not in the store: training it (%d steps)", path.name, recipe.steps)
        model, metrics = train_stand_in(arch, objective, seed, recipe)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS)
            config = {
                "key": key,
                "weights_sha256": sha256_file(tmp / WEIGHTS),
                "torch": torch.__version__,
                "hierarchy": HIERARCHY.to_dict(),
            }
            (tmp / TRAIN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
            tmp.replace(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "stand-in %s trained in %.0f s: %s", path.name, metrics["train_seconds"],
            ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("acc", "cpcc"))),
        )  # fmt: skip
    return path


def load_stand_in(path: Path) -> tuple[StandIn, dict[str, Any], dict[str, float]]:
    """``(model in eval mode, train_config, metrics)`` of a store folder."""
    config = json.loads((path / TRAIN_CONFIG).read_text())
    key = config["key"]
    recipe = Recipe.from_dict(key["recipe"])
    n_classes = [HIERARCHY.n_classes(lv) for lv in range(HIERARCHY.n_levels)]
    model = make_stand_in(key["arch"], recipe.image_size, n_classes, dict(recipe.arch_kwargs))
    try:
        model.load_state_dict(load_file(path / WEIGHTS))
    except RuntimeError as e:
        raise HsaeError(
            f"stand-in store entry {path} does not fit the current {key['arch']!r} code ({e}); "
            f"delete {path} to retrain it, or bump STORE_FORMAT when the architecture changes"
        ) from e
    metrics = json.loads((path / METRICS).read_text())
    return model.eval(), config, metrics
