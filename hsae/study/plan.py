"""What a study computes: its backbone units and SAE jobs, each with the ordinary run config
it stands for, and where each lands in the study's folder.

A *unit* is one backbone network at one layer (a config x a seed x a layer); a *job* is one
unit's SAE bank for one SAE seed (every expansion x every k of the grid, trained together
on the same batches by ``hsae.training.run.train``). A job's folder name ends with a hash
of its config, so a changed config lands in a new folder and a stale run is never reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hsae.config import flatten
from hsae.errors import HsaeError
from hsae.study.config import KindConfig, StudyConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Keys that change how a job is shown or logged, not what it computes: left out of its hash.
_COSMETIC = ("logger", "trainer.enable_progress_bar", "trainer.log_every_n_steps", "cache.dir")


@dataclass
class Unit:
    kind: str  # the kind's label
    role: str  # baseline | treatment
    config: str  # the backbone config's name (conf/backbone)
    seed: int | None  # backbone.init_seed; None: the config's own weights
    layer_pos: int  # position in the kind's layer list (layers are compared by position)
    backbone: dict[str, Any]  # the backbone config, overrides applied

    @property
    def name(self) -> str:
        """``stand_in_hier-s0-l3``: unique within a study (kinds hold distinct configs/seeds)."""
        seed = "" if self.seed is None else f"-s{self.seed}"
        return f"{self.config}{seed}-l{self.backbone['layer']}"

    @property
    def network(self) -> str:
        """The network without its layer: what backbone-level resampling draws."""
        return self.config if self.seed is None else f"{self.config}-s{self.seed}"

    def record(self) -> dict[str, Any]:
        """The unit as ``results.json`` lists it."""
        return {
            "name": self.name,
            "network": self.network,
            "kind": self.kind,
            "role": self.role,
            "config": self.config,
            "seed": self.seed,
            "layer_pos": self.layer_pos,
            "layer": self.backbone["layer"],
        }


@dataclass
class Job:
    unit: Unit
    sae_seed: int
    cfg: DictConfig  # the ordinary run config (bank of the grid), unresolved
    run_dir: Path


def group_node(group: str, option: str) -> dict[str, Any]:
    """A config group's option (``backbone=stand_in_hier``) as a plain dict, composed by
    Hydra (its own defaults applied), inside the entry point's Hydra context or on its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"{group}={option}"]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose(config_name="train", overrides=overrides)
        else:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides)
    except Exception as e:  # Hydra's missing-option error lists the valid ones
        raise HsaeError(f"study: {group}={option} does not compose: {e}") from None
    node = OmegaConf.to_container(cfg[group], resolve=True)
    assert isinstance(node, dict)
    return node


def _entries(kind: KindConfig) -> list[tuple[str, list[int] | None, dict[str, Any]]]:
    out = []
    for entry in kind.backbones:
        if isinstance(entry, str):
            out.append((entry, kind.layers, {}))
            continue
        entry = dict(entry)
        unknown = sorted(set(entry) - {"config", "layers", "overrides"})
        if "config" not in entry or unknown:
            raise HsaeError(
                f"study kind {kind.label}: backbone entry {entry} must be a config name or "
                "{config: <name>, layers: [...], overrides: {...}}"
            )
        out.append(
            (entry["config"], entry.get("layers", kind.layers), dict(entry.get("overrides") or {}))
        )
    return out


def make_units(study: StudyConfig) -> list[Unit]:
    units: list[Unit] = []
    n_positions: set[int] = set()
    for kind in study.kinds:
        for config, layers, entry_overrides in _entries(kind):
            base = group_node("backbone", config) | dict(kind.overrides) | entry_overrides
            layer_list = list(layers) if layers is not None else [int(base["layer"])]
            n_positions.add(len(layer_list))
            for seed in kind.seeds if kind.seeds is not None else [None]:
                for pos, layer in enumerate(layer_list):
                    backbone = copy.deepcopy(base) | {"layer": int(layer)}
                    if seed is not None:
                        backbone["init_seed"] = int(seed)
                    units.append(Unit(kind.label, kind.role, config, seed, pos, backbone))
    if len(n_positions) > 1:
        raise HsaeError(
            f"study {study.name}: backbones compare {sorted(n_positions)} layers; layers are "
            "compared by position, so give every backbone the same number of layers"
        )
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise HsaeError(f"study {study.name}: two units share a name in {names}; kinds must differ")
    return units


def dataset_node(run_cfg: DictConfig, study: StudyConfig) -> dict[str, Any]:
    if study.dataset is None:
        node = OmegaConf.to_container(run_cfg.dataset, resolve=True)
    else:
        node = group_node("dataset", study.dataset)
    assert isinstance(node, dict)
    return node | dict(study.dataset_overrides)


def grid(study: StudyConfig) -> list[dict[str, Any]]:
    """The bank entries: every expansion x every k, with the study's SAE overrides."""
    return [
        dict(study.sae_overrides) | {"expansion": e, "k": k}
        for e in study.expansions
        for k in study.ks
    ]


def config_hash(resolved: dict[str, Any]) -> str:
    computed = {k: v for k, v in flatten(resolved).items() if not k.startswith(_COSMETIC)}
    return hashlib.sha256(json.dumps(computed, sort_keys=True, default=str).encode()).hexdigest()[
        :10
    ]


def make_jobs(
    run_cfg: DictConfig, study: StudyConfig, units: list[Unit], out_dir: Path
) -> list[Job]:
    """One job per unit x SAE seed: the run config with the unit's backbone, the study's
    dataset, the grid as a bank and ``study`` unset (so it reads like any single run)."""
    base = OmegaConf.to_container(run_cfg, resolve=False)
    assert isinstance(base, dict)
    base["study"] = None
    base["dataset"] = dataset_node(run_cfg, study)
    base["bank"] = grid(study)
    base["sae"] = {**base["sae"], **dict(study.sae_overrides)}
    base["trainer"]["enable_progress_bar"] = False  # the study logs its own progress
    if not study.log_runs:
        base["logger"]["kind"] = "csv"
    jobs = []
    for unit in units:
        for sae_seed in study.sae_seeds:
            job = copy.deepcopy(base) | {"backbone": unit.backbone, "seed": int(sae_seed)}
            cfg = OmegaConf.create(job)
            resolved = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(resolved, dict)
            run_dir = out_dir / "sae" / unit.name / f"seed{sae_seed}-{config_hash(resolved)}"
            jobs.append(Job(unit, int(sae_seed), cfg, run_dir))
    return jobs


def l0_targets(study: StudyConfig) -> list[float]:
    return sorted(float(v) for v in (study.l0_targets or study.ks))
