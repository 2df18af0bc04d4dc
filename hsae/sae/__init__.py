"""SAE architectures (pure ``nn.Module``s) behind one registry, and their files on disk."""

from __future__ import annotations

import dataclasses
import inspect
import json
import struct
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from hsae import rundir
from hsae.errors import HsaeError
from hsae.rundir import replace_atomic, tmp_path
from hsae.sae.base import ForwardOutput, SparseAutoencoder
from hsae.sae.batchtopk import BatchTopKSAE
from hsae.sae.gated import GatedSAE
from hsae.sae.hierarchical import HierarchicalSAE
from hsae.sae.jumprelu import JumpReLUSAE
from hsae.sae.matryoshka import MatryoshkaSAE
from hsae.sae.relu import ReLUSAE
from hsae.sae.topk import TopKSAE

__all__ = [
    "SAE_REGISTRY",
    "WEIGHTS_FILE",
    "BatchTopKSAE",
    "ForwardOutput",
    "GatedSAE",
    "HierarchicalSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "load_sae",
    "make_sae",
    "save_sae",
]

SAE_REGISTRY: dict[str, type[SparseAutoencoder]] = {
    cls.arch: cls
    for cls in (
        ReLUSAE,
        TopKSAE,
        BatchTopKSAE,
        JumpReLUSAE,
        GatedSAE,
        MatryoshkaSAE,
        HierarchicalSAE,
    )
}
WEIGHTS_FILE = rundir.WEIGHTS
FOLDED_SCALE_KEY = "folded_input_scale"  # metadata: the scale save_sae folded into the weights


def make_sae(arch: str, **kwargs: Any) -> SparseAutoencoder:
    if arch not in SAE_REGISTRY:
        raise HsaeError(f"sae.arch={arch!r} is not known; valid: {', '.join(sorted(SAE_REGISTRY))}")
    params = inspect.signature(SAE_REGISTRY[arch].__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = ", ".join(p for p in params if p != "self")
        raise HsaeError(f"sae.arch={arch!r} takes no {', '.join(unknown)}; it takes: {valid}")
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


def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``sae.safetensors``: float32 weights with the input scale folded in (so any
    reader computes the same codes and reconstructions from raw inputs without knowing it),
    integer buffers as they are, and as metadata the SAE's config and the folded scale."""
    path = Path(directory) / WEIGHTS_FILE
    tmp = tmp_path(path)
    metadata = {
        "config": json.dumps(sae.config()),
        # A folded SAE saved again (input_scale 1) still carries the scale in its weights.
        FOLDED_SCALE_KEY: repr(float(sae.input_scale) * sae.folded_input_scale),
    }
    save_file(sae.folded_state_dict(), str(tmp), metadata=metadata)
    _sort_metadata(tmp)
    replace_atomic(tmp, path)
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite the JSON header of the safetensors file ``path`` with its metadata keys sorted.

    safetensors' Rust writer holds the metadata in a hash map with a random seed per map, so
    the keys come out in a different order from call to call: the same SAE gave files of
    different bytes (and sha256). Only the header changes, in place: its compact JSON with
    minimal escaping is never longer than the writer's, and is padded with spaces to the
    same length, so the length prefix and the data offsets stay as they are."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:
            raise HsaeError(
                f"{path}: the sorted safetensors header ({len(text)} bytes) is longer than the "
                f"written one ({length}); this safetensors version writes headers hsae does not "
                "know: report it with `pip show safetensors`"
            )
        f.seek(8)
        f.write(text.ljust(length))


def load_sae(path: str | Path, unfold: bool = False) -> SparseAutoencoder:
    """Rebuild an SAE from ``sae.safetensors`` (a file or the folder that holds it).

    As written, the input scale is folded into the weights (``input_scale`` = 1, decoder
    rows of norm ``s``): right for inference and export, but ``normalize_decoder`` and
    ``set_input_scale`` refuse it. ``unfold=True`` gives back the training form
    (``input_scale = s``, unit-norm decoder rows), to train further."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise HsaeError(f"{path} does not exist: the run did not finish, or this is not a run dir")
    from safetensors import SafetensorError, safe_open

    damaged = (
        "retrain the run (rerun train.py with its hydra.run.dir and skip_finished=false: it "
        "resumes from checkpoints/last.ckpt when there is one) or restore the file"
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise HsaeError(
            f"{path} is not a readable safetensors file ({e}): it is truncated or damaged; "
            f"{damaged}"
        ) from None
    if "config" not in metadata:
        raise HsaeError(f"{path} has no hsae config in its metadata; it was not written by hsae")
    try:
        config = json.loads(metadata["config"])
        sae = make_sae(**config)
    except (ValueError, TypeError) as e:
        raise HsaeError(
            f"{path} has a damaged hsae config in its metadata ({e}); {damaged}"
        ) from None
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:  # missing tensors, or shapes that do not match the config
        detail = " ".join(str(e).split())
        raise HsaeError(
            f"{path} does not match the SAE its metadata describes ({detail}): it is damaged "
            f"or was edited; {damaged}"
        ) from None
    # Files from before input normalisation were never scaled.
    sae.folded_input_scale = float(metadata.get(FOLDED_SCALE_KEY, "1.0"))
    if unfold:
        sae.unfold_input_scale()
    return sae
