"""SAE architectures (pure ``nn.Module``s) behind one registry, and their files on disk."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from hsae.errors import HsaeError
from hsae.sae.base import ForwardOutput
from hsae.sae.topk import TopKSAE

__all__ = [
    "SAE_REGISTRY",
    "WEIGHTS_FILE",
    "ForwardOutput",
    "TopKSAE",
    "load_sae",
    "make_sae",
    "save_sae",
]

SAE_REGISTRY: dict[str, type[nn.Module]] = {"topk": TopKSAE}
WEIGHTS_FILE = "sae.safetensors"


def make_sae(arch: str, **kwargs: Any) -> nn.Module:
    if arch not in SAE_REGISTRY:
        raise HsaeError(f"sae.arch={arch!r} is not known; valid: {', '.join(sorted(SAE_REGISTRY))}")
    return SAE_REGISTRY[arch](**kwargs)


def sae_kwargs(sae_cfg: Any, d_model: int) -> dict[str, Any]:
    """Constructor arguments of ``sae_cfg.arch`` taken from an ``SAEConfig``.

    The config holds every architecture's fields (one flat namespace, so W&B compares
    ``sae.k`` across runs); each architecture takes the ones its ``__init__`` names.
    """
    if sae_cfg.arch not in SAE_REGISTRY:
        raise HsaeError(
            f"sae.arch={sae_cfg.arch!r} is not known; valid: {', '.join(sorted(SAE_REGISTRY))}"
        )
    params = inspect.signature(SAE_REGISTRY[sae_cfg.arch].__init__).parameters
    fields = {f.name: getattr(sae_cfg, f.name) for f in dataclasses.fields(sae_cfg)}
    kwargs = {name: value for name, value in fields.items() if name in params}
    return {"arch": sae_cfg.arch, **kwargs, "d_model": d_model}


def save_sae(sae: nn.Module, directory: str | Path) -> Path:
    """Write ``sae.safetensors`` (float32 weights, with the SAE's config as metadata)."""
    path = Path(directory) / WEIGHTS_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file(state, str(tmp), metadata={"config": json.dumps(sae.config())})
    tmp.replace(path)
    return path


def load_sae(path: str | Path) -> nn.Module:
    """Rebuild an SAE from ``sae.safetensors`` (a file or the folder that holds it)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise HsaeError(f"{path} does not exist: the run did not finish, or this is not a run dir")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise HsaeError(f"{path} has no hsae config in its metadata; it was not written by hsae")
    config = json.loads(metadata["config"])
    sae = make_sae(**config)
    sae.load_state_dict(load_file(str(path)))
    return sae
