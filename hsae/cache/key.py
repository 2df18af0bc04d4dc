"""What a cache holds and what it is called: the request, its spec, the key (a hash of the
spec) and the folder named by it. Changing anything here renames every existing cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hsae.backbones import Backbone
from hsae.cache.files import CACHE_FORMAT
from hsae.data.activations import ActivationArray


@dataclass(frozen=True)
class CacheRequest:
    """What to cache: one layer and token selection of one backbone over one dataset split.

    ``shard_rows``, ``batch_size``, ``num_workers``, ``device`` and ``verify`` change how a
    cache is built or opened, not what it holds, so they are not part of its key.
    """

    layer: int
    tokens: str
    dtype: str = "float16"
    shard_rows: int = 262_144
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    verify: bool = False  # checksum every shard when opening (reads the whole cache once)

    @classmethod
    def from_config(cls, backbone_cfg: Any, cache_cfg: Any) -> CacheRequest:
        """The request of a ``BackboneConfig`` and a ``CacheConfig``: the one constructor
        train.py and evaluate.py share, so no setting (``cache.verify``) is dropped."""
        return cls(
            layer=backbone_cfg.layer,
            tokens=backbone_cfg.tokens,
            dtype=cache_cfg.dtype,
            shard_rows=cache_cfg.shard_rows,
            batch_size=cache_cfg.batch_size,
            num_workers=cache_cfg.num_workers,
            device=cache_cfg.device,
            verify=cache_cfg.verify,
        )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cache_spec(backbone: Backbone, backbone_cfg: dict, dataset: Any, req: CacheRequest) -> dict:
    """Everything that determines a cache's contents; its hash names the folder."""
    return {
        "format": CACHE_FORMAT,
        "backbone": {
            "loader": backbone_cfg["loader"],
            "model_name": backbone_cfg["model_name"],
            "pretrained": backbone_cfg["pretrained"],
            "fingerprint": backbone.fingerprint(),
        },
        "preprocess": backbone.preprocess_spec(),
        "layer": req.layer,
        "tokens": req.tokens,
        "dataset": dataset.describe(),
        "dtype": req.dtype,
    }


def array_spec(source: ActivationArray, req: CacheRequest) -> dict:
    """The key of a cache copied from an activations file: the file, split and dtype."""
    return {"format": CACHE_FORMAT, "dataset": source.describe(), "dtype": req.dtype}


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir_for(root: Path, spec: dict, backbone_name: str | None) -> Path:
    ds = spec["dataset"]
    if "layer" in spec:
        readable = f"{ds['name']}-{ds['split']}_{backbone_name}_l{spec['layer']}_{spec['tokens']}"
    else:
        readable = f"{ds['name']}-{ds['split']}_{ds.get('stem', 'array')}"
    return Path(root).expanduser().resolve() / f"{readable}_{spec_key(spec)}"
