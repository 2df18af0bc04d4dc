"""The activation cache: a backbone's activations at one layer over one dataset split.

A cache is a folder named by a hash of everything that determines its contents (backbone
and its image-tower weight fingerprint, layer, token selection, dataset and split and its
files, preprocessing, storage dtype). Inside:

- ``shard-NNNNN.npy``: ``[rows, d]`` activations in the storage dtype (memory-mappable;
  bfloat16 is stored as its uint16 bit pattern), each with a ``shard-NNNNN.json`` receipt
  (rows, bytes, sha256, the images it covers, the images it skipped);
- ``labels.npy``: ``[n_images, n_levels]`` labels of every dataset image;
- ``image_ids.npy`` (only when some images were skipped, or for an activations file): the
  dataset index of each cached image, in row order;
- ``images.txt``: the name of each dataset image (its file path inside the dataset);
- ``manifest.json``: written last, so a folder without it is unfinished.

Row ``r`` comes from image ``image_ids[r // tokens_per_image]`` (``r // tokens_per_image``
when there are no ``image_ids``) and token ``token_index[r % tokens_per_image]`` (``-1``:
mean-pooled, or unknown for an activations file).

Variable token counts (``tokens=segments``, CAST's segment tokens): ``tokens_per_image`` is
null and ``row_index.npy`` (``[rows, 2]``: dataset image, token) gives each row's image and
token; ``segment_trees.npz`` holds each image's part-whole segment tree (``SegmentTreeStore``).

Each shard is written to a temporary name and renamed; a killed build resumes from the
shards whose receipts match. Concurrent builders of one cache serialise on a file lock next
to the folder: the first builds, the others wait and reuse it. ``docs/cache.md`` has more.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import hsae
from hsae.backbones import POOLED_TOKEN, Backbone
from hsae.data.activations import ActivationArray
from hsae.data.common import ImageError
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.rundir import sha256_file, write_atomic, write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
MANIFEST = "manifest.json"
LABELS = "labels.npy"
IMAGE_IDS = "image_ids.npy"
IMAGE_NAMES = "images.txt"
ROW_INDEX = "row_index.npy"  # ragged caches: [rows, 2] (dataset image, token) of each row
SEGMENT_TREES = "segment_trees.npz"  # ragged caches: each image's segment tree
_NUMPY_STORAGE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


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


# ---- atomic files --------------------------------------------------------------------


def _atomic_write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, trailing_newline=False)


def _save_npy(path: Path, array: np.ndarray) -> str:
    return write_atomic(path, lambda f: np.save(f, array))


# ---- building ------------------------------------------------------------------------


def get_or_build(
    root: str | Path,
    backbone: Backbone | None,
    backbone_cfg: dict | None,
    dataset: Any,
    req: CacheRequest,
) -> ActivationCache:
    """Open the cache for this request, building it first when it does not exist yet.

    ``dataset`` is an image dataset (``hsae.data``) captured through ``backbone``, or an
    ``ActivationArray`` whose rows are copied as they are (``backbone`` may then be None).
    """
    if isinstance(dataset, ActivationArray):
        spec = array_spec(dataset, req)
        path = cache_dir_for(Path(root), spec, None)
    else:
        if backbone is None or backbone_cfg is None:
            raise HsaeError("caching an image dataset needs a backbone")
        spec = cache_spec(backbone, backbone_cfg, dataset, req)
        path = cache_dir_for(Path(root), spec, backbone.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process that is building %s", path)
        lock.acquire()
    try:
        if (path / MANIFEST).exists():
            log.info("reusing activation cache %s", path)
        elif isinstance(dataset, ActivationArray):
            _Builder(path, spec, req).build_from_array(dataset)
        else:
            assert backbone is not None
            _Builder(path, spec, req).build_from_images(backbone, dataset)
    finally:
        lock.release()
    return ActivationCache.open(path, verify=req.verify)


def _collate(batch: list[tuple[Any, int]]):
    """Stack the readable images; set unreadable ones (``ImageError``) aside."""
    kept = [(image, i) for image, i in batch if not isinstance(image, ImageError)]
    failed = [(i, image) for image, i in batch if isinstance(image, ImageError)]
    images = torch.stack([image for image, _ in kept]) if kept else None
    return images, [i for _, i in kept], failed


class _Builder:
    """Writes one cache folder shard by shard, then its labels and manifest."""

    def __init__(self, path: Path, spec: dict, req: CacheRequest):
        self.path, self.spec, self.req = path, spec, req
        self.storage = _NUMPY_STORAGE[req.dtype]

    # -- shards --

    def _shard_paths(self, s: int) -> tuple[Path, Path]:
        return self.path / f"shard-{s:05d}.npy", self.path / f"shard-{s:05d}.json"

    def _finished(self, s: int, first: int, last: int) -> dict | None:
        """The receipt of shard ``s`` when an earlier build finished it with this layout."""
        shard, receipt_path = self._shard_paths(s)
        if not (shard.exists() and receipt_path.exists()):
            return None
        try:
            receipt = json.loads(receipt_path.read_text())
        except json.JSONDecodeError:
            return None
        same_layout = (receipt.get("first_image"), receipt.get("last_image")) == (first, last)
        if not same_layout or shard.stat().st_size != receipt.get("bytes"):
            return None
        return receipt

    def _write_shard(
        self, s: int, rows: torch.Tensor, first: int, last: int, skipped: list[dict]
    ) -> dict:
        shard, receipt_path = self._shard_paths(s)
        stored = rows.to(_TORCH_DTYPES[self.req.dtype])
        array = (stored.view(torch.uint16) if self.req.dtype == "bfloat16" else stored).numpy()
        sha = _save_npy(shard, array)
        receipt = {
            "rows": len(array),
            "bytes": shard.stat().st_size,
            "sha256": sha,
            "first_image": first,
            "last_image": last,
            "skipped": skipped,
        }
        _atomic_write_json(receipt_path, receipt)
        return receipt

    def _check_disk(self, n_rows_left: int, d_model: int) -> None:
        need = n_rows_left * d_model * np.dtype(self.storage).itemsize
        free = shutil.disk_usage(self.path).free
        if need * 1.05 > free:
            raise HsaeError(
                f"activation cache needs {need / 1e9:.2f} GB more but {self.path.parent} has "
                f"{free / 1e9:.2f} GB free; free space, set cache.dir elsewhere, or use "
                "dataset.max_images / cache.dtype=float16"
            )

    def _plan(self, n_images: int, images_per_shard: int) -> list[tuple[int, int]]:
        return [
            (first, min(n_images, first + images_per_shard))
            for first in range(0, n_images, images_per_shard)
        ]

    # -- images through a backbone --

    def build_from_images(self, backbone: Backbone, dataset: Any) -> None:
        req = self.req
        device = resolve_device(req.device)
        info = backbone.check_layer(req.layer)
        ragged = req.tokens == "segments"  # a different number of rows per image
        if ragged:
            from hsae.backbones.cast import CastBackbone

            if not isinstance(backbone, CastBackbone):
                raise HsaeError(
                    f"backbone.tokens=segments needs a backbone with segment tokens (CAST, "
                    f"loader: cast); {backbone.name} has fixed tokens: use cls, patch or mean"
                )
            segment_backbone = backbone
            token_index = torch.empty(0, dtype=torch.long)
            tokens_per_image = info.n_tokens  # nominal, to size shards
        else:
            _, token_index = backbone.select(
                torch.zeros(1, info.n_tokens, info.d_model), req.tokens
            )
            tokens_per_image = len(token_index)
        n_images = len(dataset)
        plan = self._plan(n_images, max(1, req.shard_rows // tokens_per_image))
        self.path.mkdir(parents=True, exist_ok=True)
        receipts: list[dict | None] = [self._finished(s, a, b) for s, (a, b) in enumerate(plan)]
        if ragged:  # a shard counts as done only with its row index and trees beside it
            receipts = [
                r if self._ragged_path(s).exists() else None for s, r in enumerate(receipts)
            ]
        n_done = sum(b - a for (a, b), r in zip(plan, receipts, strict=True) if r is not None)
        self._check_disk((n_images - n_done) * tokens_per_image, info.d_model)
        if n_done:
            log.info("resuming %s: %d of %d images already cached", self.path, n_done, n_images)

        # Workers resize and crop; whole batches are normalised on the device.
        dataset.transform = backbone.resize_crop
        backbone.model.to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        log.info(
            "building activation cache %s (%d images, %d shards)", self.path, n_images, len(plan)
        )
        progress = tqdm(
            total=n_images, initial=n_done, desc="caching", unit="img", dynamic_ncols=True
        )
        t0 = time.perf_counter()
        try:
            for s, (first, last) in enumerate(plan):
                if receipts[s] is not None:
                    continue
                loader = DataLoader(
                    Subset(dataset, range(first, last)),
                    batch_size=req.batch_size,
                    num_workers=req.num_workers,
                    collate_fn=_collate,
                    pin_memory=device.type == "cuda",
                )
                chunks: list[torch.Tensor] = []
                skipped: list[dict] = []
                ragged_parts: list[dict] = []
                for images, kept, failed in loader:
                    skipped.extend(
                        {"index": i, "file": e.file, "error": e.error} for i, e in failed
                    )
                    if images is not None:
                        images = backbone.normalize(images.to(device, non_blocking=True))
                        if ragged:
                            with autocast:
                                segment_rows, trees = segment_backbone.capture_segments(
                                    images, req.layer
                                )
                            rows = segment_rows.rows_nd.float()
                            ragged_parts.append(_ragged_part(kept, segment_rows, trees))
                        else:
                            with autocast:
                                acts = backbone.capture(images, [req.layer])
                            rows, _ = backbone.select(acts[req.layer].float(), req.tokens)
                        if not torch.isfinite(rows).all():
                            raise HsaeError(
                                f"backbone {backbone.name} produced NaN/Inf activations at layer "
                                f"{req.layer} for images {first}..{last - 1}; check the "
                                "checkpoint and the input images"
                            )
                        chunks.append(rows.to(_TORCH_DTYPES[req.dtype]).cpu())
                    progress.update(len(failed) + (0 if images is None else len(images)))
                shard = torch.cat(chunks) if chunks else torch.empty(0, info.d_model)
                if ragged:  # before the receipt, so a receipt means both are there
                    _save_npz(self._ragged_path(s), _join_ragged(ragged_parts))
                receipts[s] = self._write_shard(s, shard, first, last, skipped)
        finally:
            progress.close()
            backbone.model.to("cpu")
        skipped_all = [item for r in receipts if r is not None for item in r["skipped"]]
        if len(skipped_all) == n_images:
            raise HsaeError(
                f"no image of {dataset.describe()['name']} could be read (first error: "
                f"{skipped_all[0]['file']}: {skipped_all[0]['error']})"
            )
        if skipped_all:
            log.warning(
                "skipped %d unreadable images (listed in %s), e.g. %s: %s",
                len(skipped_all),
                self.path / MANIFEST,
                skipped_all[0]["file"],
                skipped_all[0]["error"],
            )
            bad = {item["index"] for item in skipped_all}
            image_ids = np.asarray([i for i in range(n_images) if i not in bad], dtype=np.int64)
        else:
            image_ids = None
        self._finish(
            receipts,
            labels_nl=dataset.labels_nl,
            hierarchy=dataset.hierarchy,
            n_images=n_images,
            image_ids=image_ids,
            image_names=[dataset.image_name(i) for i in range(n_images)]
            if hasattr(dataset, "image_name")
            else None,
            d_model=info.d_model,
            tokens_per_image=None if ragged else tokens_per_image,
            token_index=None if ragged else token_index.tolist(),
            skipped=skipped_all,
            extra={
                "layer": {"name": info.name, "n_tokens": info.n_tokens},
                **(self._finish_ragged(len(plan)) if ragged else {}),
            },
            seconds=time.perf_counter() - t0,
        )
        if ragged:  # the joined files are in the manifest now
            for s in range(len(plan)):
                self._ragged_path(s).unlink(missing_ok=True)

    # -- variable token counts: per-shard row index and trees, joined at the end --

    def _ragged_path(self, s: int) -> Path:
        return self.path / f"ragged-{s:05d}.npz"

    def _finish_ragged(self, n_shards: int) -> dict:
        parts = []
        for s in range(n_shards):
            with np.load(self._ragged_path(s)) as f:
                parts.append(dict(f))
        joined = _join_ragged(parts)
        _save_npy(self.path / ROW_INDEX, joined.pop("row_index"))
        _save_npz(self.path / SEGMENT_TREES, joined)
        return {"row_index": ROW_INDEX, "segment_trees": SEGMENT_TREES}

    # -- rows of a user's array --

    def build_from_array(self, source: ActivationArray) -> None:
        plan = self._plan(len(source), self.req.shard_rows)
        self.path.mkdir(parents=True, exist_ok=True)
        receipts: list[dict | None] = [self._finished(s, a, b) for s, (a, b) in enumerate(plan)]
        n_done = sum(b - a for (a, b), r in zip(plan, receipts, strict=True) if r is not None)
        self._check_disk(len(source) - n_done, source.d_model)
        progress = tqdm(
            total=len(source), initial=n_done, desc="copying", unit="row", dynamic_ncols=True
        )
        t0 = time.perf_counter()
        try:
            for s, (first, last) in enumerate(plan):
                if receipts[s] is not None:
                    continue
                rows = torch.from_numpy(source.read_rows(source.rows[first:last]))
                if not torch.isfinite(rows).all():
                    bad = int(source.rows[first + int((~torch.isfinite(rows)).any(1).nonzero()[0])])
                    raise HsaeError(f"{source.file} has NaN/Inf values (row {bad})")
                receipts[s] = self._write_shard(s, rows, first, last, [])
                progress.update(last - first)
        finally:
            progress.close()
        self._finish(
            receipts,
            labels_nl=source.labels_nl,
            hierarchy=source.hierarchy,
            n_images=source.n_source_rows,
            image_ids=source.rows.astype(np.int64),
            image_names=None,
            d_model=source.d_model,
            tokens_per_image=1,
            token_index=[POOLED_TOKEN],
            skipped=[],
            extra={"source_file": str(source.file)},
            seconds=time.perf_counter() - t0,
        )

    # -- the rest, manifest last --

    def _finish(
        self,
        receipts: list[dict | None],
        *,
        labels_nl: np.ndarray,
        hierarchy: Hierarchy,
        n_images: int,
        image_ids: np.ndarray | None,
        image_names: list[str] | None,
        d_model: int,
        tokens_per_image: int | None,
        token_index: list[int] | None,
        skipped: list[dict],
        extra: dict,
        seconds: float,
    ) -> None:
        shards = []
        for s, receipt in enumerate(receipts):
            assert receipt is not None
            shards.append(
                {
                    "file": self._shard_paths(s)[0].name,
                    **{k: receipt[k] for k in ("rows", "bytes", "sha256")},
                    "first_image": receipt["first_image"],
                    "last_image": receipt["last_image"],
                }
            )
        _save_npy(self.path / LABELS, np.asarray(labels_nl, dtype=np.int64))
        if image_ids is not None:
            _save_npy(self.path / IMAGE_IDS, image_ids)
        if image_names is not None:
            text = "".join(f"{name}\n" for name in image_names)
            write_atomic(self.path / IMAGE_NAMES, text)
        n_kept = n_images if image_ids is None else len(image_ids)
        manifest = {
            "format": CACHE_FORMAT,
            "key": spec_key(self.spec),
            "spec": self.spec,
            "hsae_version": hsae.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_rows": sum(sh["rows"] for sh in shards),
            "d_model": d_model,
            "dtype": self.req.dtype,
            "tokens_per_image": tokens_per_image,
            "token_index": token_index,
            "n_images": n_images,
            "n_cached_images": n_kept,
            "image_ids": IMAGE_IDS if image_ids is not None else None,
            "image_names": IMAGE_NAMES if image_names is not None else None,
            "n_skipped": len(skipped),
            "skipped": skipped,
            "label_levels": list(hierarchy.level_names),
            "hierarchy": hierarchy.to_dict(),
            "shards": shards,
            "build_seconds": round(seconds, 3),
            **extra,
        }
        _atomic_write_json(self.path / MANIFEST, manifest)
        # Left by an interrupted build: shards of an earlier layout (another shard_rows) and
        # half-written temporary files. Only the lock holder writes here, so none is live.
        listed = {sh["file"] for sh in shards} | {Path(sh["file"]).stem + ".json" for sh in shards}
        for stale in [*self.path.glob("shard-*"), *self.path.glob(".*.tmp-*")]:
            if stale.name not in listed:
                stale.unlink(missing_ok=True)
        log.info("cached %d rows in %.1fs at %s", manifest["n_rows"], seconds, self.path)


# ---- reading -------------------------------------------------------------------------


class ActivationCache:
    """Read access to a finished cache; rows come back as float32 tensors."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        shards: list[np.ndarray],
        labels_nl: np.ndarray,
        image_ids: np.ndarray | None,
    ):
        self.path = path
        self.manifest = manifest
        self._shards = shards
        self._offsets = np.cumsum([0] + [len(s) for s in shards])
        self.labels_nl = labels_nl
        self.image_ids = image_ids  # dataset index of each cached image; None: all, in order
        self.hierarchy = Hierarchy.from_dict(manifest["hierarchy"])
        self._token_index = np.asarray(manifest["token_index"])
        # Ragged caches: [rows, 2] (dataset image, token) of every row, memory-mapped.
        self.row_index = (
            np.load(path / manifest["row_index"], mmap_mode="r")
            if manifest.get("row_index")
            else None
        )

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> ActivationCache:
        """Open and check a cache: every shard present with its recorded size and shape, and
        its checksum when ``verify``."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise HsaeError(
                f"no activation cache at {path} (missing {MANIFEST}); rerun train.py to build it"
            )
        rebuild_all = f"delete {path} and rerun train.py to rebuild it"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise HsaeError(f"{manifest_path} is not valid JSON ({e}); {rebuild_all}") from e
        if manifest.get("format") != CACHE_FORMAT:
            raise HsaeError(
                f"{path} has cache format {manifest.get('format')}, this hsae reads "
                f"{CACHE_FORMAT}; {rebuild_all}"
            )
        if not path.name.endswith(manifest["key"]):
            raise HsaeError(
                f"{path} holds the cache with key {manifest['key']} (its folder was renamed or "
                f"copied over); {rebuild_all}"
            )
        shards = []
        for shard in manifest["shards"]:
            file = path / shard["file"]
            # The receipts stay beside the shards, so a rebuild redoes only the deleted shard.
            rebuild = (
                f"delete {file} and {manifest_path}, then rerun train.py with the same config: "
                f"that shard is rebuilt and the others are reused (or delete all of {path})"
            )
            if not file.exists():
                raise HsaeError(f"activation cache shard {file} is missing; {rebuild}")
            if file.stat().st_size != shard["bytes"]:
                raise HsaeError(
                    f"activation cache shard {file} has {file.stat().st_size} bytes, the manifest "
                    f"says {shard['bytes']} (truncated or overwritten); {rebuild}"
                )
            if verify and sha256_file(file) != shard["sha256"]:
                raise HsaeError(
                    f"activation cache shard {file} fails its checksum (the file changed after "
                    f"it was written: disk or copy error); {rebuild}"
                )
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
        labels_nl = np.load(path / LABELS)
        image_ids = np.load(path / IMAGE_IDS) if manifest["image_ids"] else None
        return cls(path, manifest, shards, labels_nl, image_ids)

    @property
    def n_rows(self) -> int:
        return int(self._offsets[-1])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def shards(self) -> list[np.ndarray]:
        """The memory-mapped shards as stored (bfloat16 as uint16)."""
        return self._shards

    def to_float(self, array: np.ndarray) -> torch.Tensor:
        """Stored rows (a shard or a slice of one) -> a float32 tensor."""
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
            out[torch.from_numpy(order[sel])] = self.to_float(
                self._shards[s][sorted_rows[sel] - self._offsets[s]]
            )
        return out

    def load_all(self) -> torch.Tensor:
        """All rows ``[n_rows, d]`` as float32."""
        return self.load_stored().float()

    def load_stored(self) -> torch.Tensor:
        """All rows ``[n_rows, d]`` in the storage dtype (float16 rows take half the memory)."""
        dtype = _TORCH_DTYPES[self.manifest["dtype"]]
        if not self._shards:
            return torch.empty(0, self.d_model, dtype=dtype)
        stored = torch.cat([torch.from_numpy(np.array(s)) for s in self._shards])
        return stored.view(torch.bfloat16) if dtype == torch.bfloat16 else stored

    def row_image(self, rows: np.ndarray) -> np.ndarray:
        """Dataset image index of each row."""
        if self.row_index is not None:
            return np.asarray(self.row_index[np.asarray(rows), 0])
        image = np.asarray(rows) // self.manifest["tokens_per_image"]
        return image if self.image_ids is None else self.image_ids[image]

    def row_token(self, rows: np.ndarray) -> np.ndarray:
        """Token index of each row inside its image (-1: mean-pooled or unknown)."""
        if self.row_index is not None:
            return np.asarray(self.row_index[np.asarray(rows), 1])
        return self._token_index[np.asarray(rows) % self.manifest["tokens_per_image"]]

    def row_labels(self, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), n_levels]`` labels of each row's image."""
        return self.labels_nl[self.row_image(rows)]

    def segment_trees(self) -> SegmentTreeStore:
        """Each image's segment tree (caches of ``tokens=segments`` only)."""
        if not self.manifest.get("segment_trees"):
            raise HsaeError(
                f"{self.path} holds no segment trees: only caches built with "
                "backbone.tokens=segments (CAST) have them"
            )
        return SegmentTreeStore.load(self.path / self.manifest["segment_trees"])

    def image_names(self) -> list[str] | None:
        """Name (file path inside the dataset) of every dataset image, by dataset index."""
        if not self.manifest.get("image_names"):
            return None
        return (self.path / self.manifest["image_names"]).read_text().splitlines()


# ---- variable token counts: segment trees -------------------------------------------


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> str:
    buffer = io.BytesIO()  # zip archives need a seekable file
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle in **
    return write_atomic(path, buffer.getvalue())


def _ragged_part(kept: list[int], segment_rows: Any, trees: Any) -> dict[str, np.ndarray]:
    """One batch's row index and segment trees as arrays (dataset image ids, not batch
    positions)."""
    ids = np.asarray(kept, dtype=np.int64)
    part = {
        "row_index": np.stack(
            [ids[segment_rows.image_n.cpu().numpy()], segment_rows.token_n.cpu().numpy()], 1
        ).astype(np.int64),
        "image_ids": ids,
        "segments": trees.segments_bhw.cpu().numpy().astype(np.int16),
    }
    for k, (parent, weight) in enumerate(zip(trees.parents, trees.confidence, strict=True)):
        part[f"parents_{k}"] = parent.cpu().numpy().astype(np.int16)
        part[f"confidence_{k}"] = weight.float().cpu().numpy().astype(np.float16)
    return part


def _join_ragged(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate batches; per-token arrays are padded to the widest (parents -1)."""
    if not parts:
        return {"row_index": np.zeros((0, 2), np.int64), "image_ids": np.zeros(0, np.int64)}
    joined = {}
    for key in parts[0]:
        arrays = [p[key] for p in parts]
        if key.startswith(("parents_", "confidence_")):
            width = max(a.shape[1] for a in arrays)
            fill = -1 if key.startswith("parents_") else 0
            arrays = [
                np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill) for a in arrays
            ]
        joined[key] = np.concatenate(arrays)
    return joined


@dataclass(frozen=True)
class SegmentTreeStore:
    """Each cached image's segment tree: ``segments [n, h, w]`` (stage-1 token of each
    stem-grid cell), ``parents[k] [n, s_k]`` (the stage-k+1 token each stage-k token is
    assigned to, -1 for padding) and ``confidence[k]`` (that assignment's weight)."""

    image_ids: np.ndarray
    segments: np.ndarray
    parents: list[np.ndarray]
    confidence: list[np.ndarray]

    @classmethod
    def load(cls, path: Path) -> SegmentTreeStore:
        with np.load(path) as f:
            n_stages = sum(1 for k in f.files if k.startswith("parents_"))
            return cls(
                f["image_ids"],
                f["segments"],
                [f[f"parents_{k}"] for k in range(n_stages)],
                [f[f"confidence_{k}"] for k in range(n_stages)],
            )

    def levels(self, image_id: int) -> list[np.ndarray]:
        """The image's partitions of the stem grid, finest first: superpixels, then each
        stage's clusters (``[h, w]`` segment ids each)."""
        where = np.flatnonzero(self.image_ids == image_id)
        if len(where) != 1:
            raise HsaeError(f"image {image_id} has no segment tree in this cache")
        i = int(where[0])
        level = self.segments[i].astype(np.int64)
        levels = [level]
        for parents in self.parents:
            level = parents[i].astype(np.int64)[level]
            levels.append(level)
        return levels
