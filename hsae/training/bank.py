"""The SAEs one job trains: one (``bank=null``) or a bank, each member a run of its own.

A bank entry overrides fields of the job's ``sae`` config (and may set ``lr``); the member's
config is then exactly the config of the single run it stands for (``bank=null``, its
``sae.*`` and ``optim.lr``), so its ``cfg.json`` reads like that run's, compare tables line
members up with single runs, and ``skip_finished`` checks each member like a run.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hsae.config import RunConfig, SAEConfig, path_safe, to_objects
from hsae.errors import HsaeError
from hsae.sae import sae_kwargs

BANK_DIR = "bank"
ENTRY_KEYS = (*(f.name for f in dataclasses.fields(SAEConfig)), "lr")


@dataclass
class Member:
    index: int
    label: str | None
    """``k=8,expansion=16`` from the bank entry (see ``entry_label``); None for the job's
    single SAE."""
    entry: dict[str, Any]
    sae: SAEConfig
    lr: float | None
    """None: scaled with the width (``hsae.training.module.default_lr``)."""
    resolved: dict[str, Any]
    """The resolved config of the single run this member stands for."""
    run_dir: Path

    @property
    def name(self) -> str | None:
        """Prefix of the member's logged metrics (``<name>/train/loss``): its folder's name."""
        return None if self.label is None else self.run_dir.name


def entry_label(entry: dict[str, Any]) -> str:
    """``k=8,expansion=16``: names the member's W&B run, like a multirun job's overrides."""
    return ",".join(f"{key}={value}" for key, value in entry.items()) or "base"


def entry_dir_name(index: int, entry: dict[str, Any]) -> str:
    """``1_k-8_expansion-16``: without ``=`` or ``,``, so the path passes unquoted as a
    Hydra override (``evaluate.py run_dir=.../bank/1_k-8_expansion-16``)."""
    text = "_".join(f"{key}-{value}" for key, value in entry.items()) or "base"
    return path_safe(f"{index}_{re.sub(r'[^A-Za-z0-9._+-]', '_', text)}", max_len=80)


def make_members(cfg: RunConfig, resolved: dict[str, Any], run_dir: Path) -> list[Member]:
    """The job's SAEs, each entry checked like a run's config; ``[the single SAE]`` without
    a bank. Unknown keys and bad values raise ``HsaeError`` naming the entry."""
    if cfg.bank is None:
        return [Member(0, None, {}, cfg.sae, cfg.optim.lr, resolved, run_dir)]
    if not cfg.bank:
        raise HsaeError("bank=[] holds no SAE; list at least one entry, or set bank=null")
    members = []
    for index, raw in enumerate(cfg.bank):
        entry = dict(raw)
        where = f"bank[{index}]={_show(entry)}"
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise HsaeError(
                f"{where} has unknown key(s) {', '.join(unknown)}; an entry overrides sae "
                f"fields or sets lr. Valid keys: {', '.join(ENTRY_KEYS)}"
            )
        member_cfg = copy.deepcopy(resolved)
        sae_entry = {key: value for key, value in entry.items() if key != "lr"}
        if "expansion" in sae_entry and "n_latents" not in sae_entry:
            sae_entry["n_latents"] = cfg.backbone.d_model * sae_entry["expansion"]
        member_cfg["sae"].update(sae_entry)
        if "lr" in entry:
            member_cfg["optim"]["lr"] = entry["lr"]
        member_cfg["bank"] = None
        try:
            # Through the schema: types are checked and converted (l1_coeff:5 -> 5.0) and
            # every __post_init__ check runs, as for a single run with these overrides.
            typed = OmegaConf.merge(OmegaConf.structured(RunConfig), member_cfg)
            member: RunConfig = OmegaConf.to_object(typed)  # type: ignore[assignment]
            sae_kwargs(member.sae, cfg.backbone.d_model)  # an unknown arch fails now, not later
        except (HsaeError, OmegaConfBaseException) as e:
            message = str(e).splitlines()[0]
            raise HsaeError(f"{where}: {message}") from None
        members.append(
            Member(
                index=index,
                label=entry_label(entry),
                entry=entry,
                sae=member.sae,
                lr=member.optim.lr,
                resolved=OmegaConf.to_container(typed, resolve=True),  # type: ignore[arg-type]
                run_dir=run_dir / BANK_DIR / entry_dir_name(index, entry),
            )
        )
    return members


def check_members(cfg_dict: DictConfig) -> None:
    """Check the run config and every bank entry, e.g. in ``train.py`` before its heavy
    imports, so a typo fails in seconds (``train`` checks again: it may be called alone)."""
    resolved = OmegaConf.to_container(cfg_dict, resolve=True)
    assert isinstance(resolved, dict)
    make_members(to_objects(cfg_dict, RunConfig), resolved, Path("."))


def _show(entry: dict[str, Any]) -> str:
    return "{" + ",".join(f"{key}:{value}" for key, value in entry.items()) + "}"
