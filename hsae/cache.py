"""The activation cache: a backbone's activations at one layer over one dataset split.

A cache is a folder named by a hash of everything that determines its contents (backbone
and its weight fingerprint, layer, token selection, dataset and split, preprocessing,
storage dtype). Inside: ``shard-NNNNN.npy`` files of ``[rows, d]`` activations
(memory-mappable), ``labels.npy`` (``[n_images, n_levels]``) and ``manifest.json``, which is
written last, so a folder without it is unfinished. Each shard is written to a temporary
name and renamed, with a small ``.json`` receipt; a build that is killed resumes from its
finished shards. Concurrent builders of one cache serialise on a file lock: the first
builds, the others wait and reuse it.

Row ``r`` comes from image ``image_ids[r // tokens_per_image]`` and token
``token_index[r % tokens_per_image]`` (``-1`` for mean-pooled rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from hsae.backbones import Backbone, select_tokens
from hsae.errors import HsaeError
from hsae.hierarchy import Hierarchy

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_NUMPY_STORAGE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheRequest:
    """What to cache: one layer and token selection of one backbone over one dataset split."""

    layer: int
    tokens: str
    dtype: str = "float16"
    shard_rows: int = 262_144
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"


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


def cache_dir_for(root: Path, spec: dict, backbone_name: str) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    ds = spec["dataset"]
    readable = f"{ds['name']}-{ds['split']}_{backbone_name}_l{spec['layer']}_{spec['tokens']}"
    return Path(root).expanduser().resolve() / f"{readable}_{key}"


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def get_or_build(
    root: str | Path, backbone: Backbone, backbone_cfg: dict, dataset: Any, req: CacheRequest
) -> ActivationCache:
    """Open the cache for this request, building it first when it does not exist yet."""
    spec = cache_spec(backbone, backbone_cfg, dataset, req)
    path = cache_dir_for(Path(root), spec, backbone.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / MANIFEST).exists():
            _build(path, spec, backbone, dataset, req)
        else:
            log.info("reusing activation cache %s", path)
    return ActivationCache.open(path)


def _build(path: Path, spec: dict, backbone: Backbone, dataset: Any, req: CacheRequest) -> None:
    device = resolve_device(req.device)
    info = backbone.check_layer(req.layer)
    probe = torch.zeros(1, info.n_tokens, info.d_model)
    _, token_index = select_tokens(probe, req.tokens, backbone.has_cls)
    tokens_per_image = len(token_index)
    n_images = len(dataset)
    images_per_shard = max(1, req.shard_rows // tokens_per_image)
    n_shards = -(-n_images // images_per_shard)
    storage = _NUMPY_STORAGE[req.dtype]
    need = n_images * tokens_per_image * info.d_model * np.dtype(storage).itemsize
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if need * 1.05 > free:
        raise HsaeError(
            f"activation cache needs {need / 1e9:.2f} GB but {path.parent} has {free / 1e9:.2f} GB "
            "free; free space, set cache.dir elsewhere, or use dataset.max_images / cache.dtype=float16"
        )

    backbone.model.to(device)
    dataset.transform = backbone.preprocess
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    log.info("building activation cache %s (%d images, %d shards)", path, n_images, n_shards)
    progress = tqdm(total=n_images, desc="caching", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    for s in range(n_shards):
        first, last = s * images_per_shard, min(n_images, (s + 1) * images_per_shard)
        shard_path, receipt_path = path / f"shard-{s:05d}.npy", path / f"shard-{s:05d}.json"
        if receipt_path.exists() and shard_path.exists():
            progress.update(last - first)  # finished by an earlier, interrupted build
            continue
        loader = DataLoader(
            Subset(dataset, range(first, last)),
            batch_size=req.batch_size,
            num_workers=req.num_workers,
            pin_memory=device.type == "cuda",
        )
        chunks = []
        for images, _ in loader:
            with autocast:
                acts = backbone.capture(images.to(device, non_blocking=True), [req.layer])[
                    req.layer
                ]
            rows, _ = select_tokens(acts.float(), req.tokens, backbone.has_cls)
            if not torch.isfinite(rows).all():
                raise HsaeError(
                    f"backbone {backbone.name} produced NaN/Inf activations at layer {req.layer} "
                    f"for images {first}..{last}; check the checkpoint and the input images"
                )
            chunks.append(rows.to(_TORCH_DTYPES[req.dtype]).cpu())
            progress.update(len(images))
        shard = torch.cat(chunks)
        array = (shard.view(torch.uint16) if req.dtype == "bfloat16" else shard).numpy()
        _atomic_write_bytes(shard_path, lambda f, a=array: np.save(f, a))
        _atomic_write_json(
            receipt_path,
            {"rows": len(array), "bytes": shard_path.stat().st_size, "sha256": _sha256(shard_path)},
        )
    progress.close()
    backbone.model.to("cpu")

    shards = []
    for s in range(n_shards):
        receipt = json.loads((path / f"shard-{s:05d}.json").read_text())
        shards.append({"file": f"shard-{s:05d}.npy", **receipt})
    _atomic_write_bytes(path / "labels.npy", lambda f: np.save(f, dataset.labels_nl))
    hierarchy: Hierarchy = dataset.hierarchy
    manifest = {
        "format": CACHE_FORMAT,
        "spec": spec,
        "n_rows": sum(sh["rows"] for sh in shards),
        "d_model": info.d_model,
        "dtype": req.dtype,
        "tokens_per_image": tokens_per_image,
        "token_index": token_index.tolist(),
        "n_images": n_images,
        "image_ids": None,  # None: every image of the dataset, in order
        "label_levels": list(hierarchy.level_names),
        "hierarchy": hierarchy.to_dict(),
        "shards": shards,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    _atomic_write_json(path / MANIFEST, manifest)
    log.info("cached %d rows in %.1fs", manifest["n_rows"], manifest["build_seconds"])


class ActivationCache:
    """Read access to a finished cache; rows come back as float32 tensors."""

    def __init__(self, path: Path, manifest: dict, shards: list[np.ndarray], labels_nl: np.ndarray):
        self.path = path
        self.manifest = manifest
        self._shards = shards
        self._offsets = np.cumsum([0] + [len(s) for s in shards])
        self.labels_nl = labels_nl
        self.hierarchy = Hierarchy.from_dict(manifest["hierarchy"])

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> ActivationCache:
        """Open and check a cache: every shard present with its recorded size (and checksum
        when ``verify``)."""
        path = Path(path)
        rebuild = f"delete {path} and rerun to rebuild it"
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise HsaeError(
                f"no activation cache at {path} (missing {MANIFEST}); rerun train.py to build it"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise HsaeError(f"{manifest_path} is not valid JSON ({e}); {rebuild}") from e
        if manifest.get("format") != CACHE_FORMAT:
            raise HsaeError(
                f"{path} has cache format {manifest.get('format')}, expected {CACHE_FORMAT}; {rebuild}"
            )
        shards = []
        for shard in manifest["shards"]:
            file = path / shard["file"]
            if not file.exists():
                raise HsaeError(f"activation cache shard {file} is missing; {rebuild}")
            if file.stat().st_size != shard["bytes"]:
                raise HsaeError(
                    f"activation cache shard {file} has {file.stat().st_size} bytes, the manifest "
                    f"says {shard['bytes']} (truncated or overwritten); {rebuild}"
                )
            if verify and _sha256(file) != shard["sha256"]:
                raise HsaeError(f"activation cache shard {file} fails its checksum; {rebuild}")
            try:
                array = np.load(file, mmap_mode="r")
            except ValueError as e:
                raise HsaeError(
                    f"activation cache shard {file} cannot be read ({e}); {rebuild}"
                ) from e
            if array.shape != (shard["rows"], manifest["d_model"]):
                raise HsaeError(
                    f"activation cache shard {file} has shape {array.shape}, expected "
                    f"({shard['rows']}, {manifest['d_model']}); {rebuild}"
                )
            shards.append(array)
        labels_nl = np.load(path / "labels.npy")
        return cls(path, manifest, shards, labels_nl)

    @property
    def n_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    def _to_float(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(array))  # a writable copy, out of the memory map
        if self.manifest["dtype"] == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.float()

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows ``[len(rows), d]`` in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        out = torch.empty(len(rows), self.d_model)
        which = np.searchsorted(self._offsets, sorted_rows, side="right") - 1
        for s in np.unique(which):
            sel = which == s
            out[torch.from_numpy(order[sel])] = self._to_float(
                self._shards[s][sorted_rows[sel] - self._offsets[s]]
            )
        return out

    def load_all(self) -> torch.Tensor:
        return (
            torch.cat([self._to_float(s) for s in self._shards])
            if self._shards
            else torch.empty(0, self.d_model)
        )

    def row_image(self, rows: np.ndarray) -> np.ndarray:
        """Dataset image index of each row."""
        image = np.asarray(rows) // self.manifest["tokens_per_image"]
        ids = self.manifest["image_ids"]
        return image if ids is None else np.asarray(ids)[image]

    def row_token(self, rows: np.ndarray) -> np.ndarray:
        """Token index of each row inside its image (-1: mean-pooled)."""
        return np.asarray(self.manifest["token_index"])[
            np.asarray(rows) % self.manifest["tokens_per_image"]
        ]

    def row_labels(self, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), n_levels]`` labels of each row's image."""
        return self.labels_nl[self.row_image(rows)]
