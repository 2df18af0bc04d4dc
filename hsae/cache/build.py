"""Building an activation cache: ``get_or_build`` opens the cache of a request, building
it first (shard by shard, resumable, one builder at a time) when it does not exist yet."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import hsae
from hsae.backbones import POOLED_TOKEN, Backbone
from hsae.cache.files import (
    CACHE_FORMAT,
    IMAGE_IDS,
    IMAGE_NAMES,
    LABELS,
    MANIFEST,
    NUMPY_STORAGE,
    TORCH_DTYPES,
    save_json,
    save_npy,
    save_npz,
)
from hsae.cache.key import (
    CacheRequest,
    array_spec,
    cache_dir_for,
    cache_spec,
    resolve_device,
    spec_key,
)
from hsae.cache.reader import ActivationCache
from hsae.cache.segments import join_ragged, join_ragged_files, ragged_part, ragged_path
from hsae.data.activations import ActivationArray
from hsae.data.common import ImageError
from hsae.errors import HsaeError
from hsae.label_tree import Hierarchy
from hsae.rundir import write_atomic

log = logging.getLogger(__name__)


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
        self.storage = NUMPY_STORAGE[req.dtype]

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
        stored = rows.to(TORCH_DTYPES[self.req.dtype])
        array = (stored.view(torch.uint16) if self.req.dtype == "bfloat16" else stored).numpy()
        sha = save_npy(shard, array)
        receipt = {
            "rows": len(array),
            "bytes": shard.stat().st_size,
            "sha256": sha,
            "first_image": first,
            "last_image": last,
            "skipped": skipped,
        }
        save_json(receipt_path, receipt)
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
            if not backbone.has_segment_tokens:
                raise HsaeError(
                    f"backbone.tokens=segments needs a backbone with segment tokens (CAST, "
                    f"loader: cast); {backbone.name} has fixed tokens: use cls, patch or mean"
                )
            token_index = torch.empty(0, dtype=torch.long)
            tokens_per_image = info.n_tokens  # nominal, to size shards
        else:
            token_index = backbone.token_index(info.n_tokens, req.tokens)
            tokens_per_image = len(token_index)
        n_images = len(dataset)
        plan = self._plan(n_images, max(1, req.shard_rows // tokens_per_image))
        self.path.mkdir(parents=True, exist_ok=True)
        receipts: list[dict | None] = [self._finished(s, a, b) for s, (a, b) in enumerate(plan)]
        if ragged:  # a shard counts as done only with its row index and trees beside it
            receipts = [
                r if ragged_path(self.path, s).exists() else None for s, r in enumerate(receipts)
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
                                segment_rows, trees = backbone.capture_segments(images, req.layer)
                            rows = segment_rows.rows_nd.float()
                            ragged_parts.append(ragged_part(kept, segment_rows, trees))
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
                        chunks.append(rows.to(TORCH_DTYPES[req.dtype]).cpu())
                    progress.update(len(failed) + (0 if images is None else len(images)))
                shard = torch.cat(chunks) if chunks else torch.empty(0, info.d_model)
                if ragged:  # before the receipt, so a receipt means both are there
                    save_npz(ragged_path(self.path, s), join_ragged(ragged_parts))
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
                **(join_ragged_files(self.path, len(plan)) if ragged else {}),
            },
            seconds=time.perf_counter() - t0,
        )
        if ragged:  # the joined files are in the manifest now
            for s in range(len(plan)):
                ragged_path(self.path, s).unlink(missing_ok=True)

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
        save_npy(self.path / LABELS, np.asarray(labels_nl, dtype=np.int64))
        if image_ids is not None:
            save_npy(self.path / IMAGE_IDS, image_ids)
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
        save_json(self.path / MANIFEST, manifest)
        # Left by an interrupted build: shards of an earlier layout (another shard_rows) and
        # half-written temporary files. Only the lock holder writes here, so none is live.
        listed = {sh["file"] for sh in shards} | {Path(sh["file"]).stem + ".json" for sh in shards}
        for stale in [*self.path.glob("shard-*"), *self.path.glob(".*.tmp-*")]:
            if stale.name not in listed:
                stale.unlink(missing_ok=True)
        log.info("cached %d rows in %.1fs at %s", manifest["n_rows"], seconds, self.path)
