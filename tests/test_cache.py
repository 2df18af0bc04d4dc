"""The activation cache: round trip, manifest, resume after a kill, concurrent builders,
damaged shards, changed inputs, unreadable images, activation files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from hsae.backbones import Backbone, Preprocess, make_backbone
from hsae.cache import MANIFEST, ActivationCache, CacheRequest, get_or_build
from hsae.config import BackboneConfig, DatasetConfig
from hsae.data import SyntheticShapes, make_dataset
from hsae.errors import HsaeError
from tests.conftest import ROOT
from tests.test_datasets import image_folder, write_image

TINY = BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=2)
TINY_CFG = asdict(TINY)


def request(**kw) -> CacheRequest:
    return CacheRequest(**{"layer": 2, "tokens": "cls", "batch_size": 8, "shard_rows": 8} | kw)


class CountingCapture:
    """Counts the images a backbone is run on (to tell reused shards from rebuilt ones)."""

    def __init__(self, backbone, monkeypatch):
        self.n_images = 0
        original = backbone.capture

        def capture(images, layers):
            self.n_images += len(images)
            return original(images, layers)

        monkeypatch.setattr(backbone, "capture", capture)


def direct(backbone, dataset, layer: int) -> torch.Tensor:
    images = torch.stack([backbone.preprocess(dataset.render(i)) for i in range(len(dataset))])
    return backbone.capture(images, [layer])[layer]


@pytest.mark.parametrize(
    "tokens,dtype,atol",
    [("patch", "float16", 2e-2), ("cls", "bfloat16", 6e-2), ("mean", "float32", 1e-5)],
)
def test_round_trip_equals_a_direct_forward_pass(tmp_path, tiny_backbone, tokens, dtype, atol):
    dataset = SyntheticShapes(6, 64, seed=0)
    cache = get_or_build(
        tmp_path,
        tiny_backbone,
        TINY_CFG,
        dataset,
        request(tokens=tokens, dtype=dtype, shard_rows=130),
    )
    acts = direct(tiny_backbone, dataset, 2)
    rows = np.arange(cache.n_rows)
    cached = cache.read(rows)
    if tokens == "patch":
        assert cache.n_rows == 6 * 64 and len(cache.shards) == 3  # 2 images (128 rows) a shard
        expected = acts[cache.row_image(rows), cache.row_token(rows)]
    elif tokens == "cls":
        expected = acts[:, 0]
    else:
        expected = acts[:, 1:].mean(1)
        assert (cache.row_token(rows) == -1).all()
    torch.testing.assert_close(cached, expected, atol=atol, rtol=atol)
    np.testing.assert_array_equal(cache.row_labels(rows), dataset.labels_nl[cache.row_image(rows)])
    torch.testing.assert_close(cache.load_all(), cached)
    itemsize = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    assert cache.shards[0].nbytes == len(cache.shards[0]) * 128 * itemsize


def test_manifest_describes_the_cache(tmp_path, tiny_backbone):
    dataset = SyntheticShapes(10, 64, seed=0)
    cache = get_or_build(
        tmp_path, tiny_backbone, TINY_CFG, dataset, request(tokens="all", shard_rows=200)
    )
    m = cache.manifest
    assert cache.path.name.endswith(m["key"]) and cache.path.name.startswith(
        "synthetic-train_tiny_vit_l2_all_"
    )
    assert m["spec"]["backbone"]["fingerprint"] == tiny_backbone.fingerprint()
    assert m["spec"]["preprocess"]["size"] == [64, 64] and m["spec"]["dataset"]["seed"] == 0
    assert (
        m["n_rows"] == 10 * 65
        and m["tokens_per_image"] == 65
        and m["token_index"] == list(range(65))
    )
    assert m["label_levels"] == ["family", "shape", "variant"]
    assert m["layer"] == {"name": "visual.transformer.resblocks.2", "n_tokens": 65}
    assert m["image_ids"] is None and m["n_skipped"] == 0 and m["skipped"] == []
    assert [s["rows"] for s in m["shards"]] == [195, 195, 195, 65]  # 3 images (195 rows) a shard
    for shard in m["shards"]:
        assert (cache.path / shard["file"]).stat().st_size == shard["bytes"]
        assert len(shard["sha256"]) == 64
    assert cache.image_names() == [f"synthetic/train/{i}" for i in range(10)]
    assert cache.row_image(np.array([0, 64, 65, 649])).tolist() == [0, 0, 1, 9]


def test_a_changed_input_builds_a_new_cache(tmp_path, tiny_backbone, monkeypatch):
    counter = CountingCapture(tiny_backbone, monkeypatch)
    ds = SyntheticShapes(4, 64, seed=0)
    base = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request())
    stamp = (base.path / MANIFEST).stat().st_mtime_ns
    assert counter.n_images == 4
    again = get_or_build(
        tmp_path, tiny_backbone, TINY_CFG, SyntheticShapes(4, 64, seed=0), request()
    )
    assert again.path == base.path and counter.n_images == 4  # reused, not rebuilt
    assert (base.path / MANIFEST).stat().st_mtime_ns == stamp
    other_layer = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request(layer=1))
    other_seed = get_or_build(
        tmp_path, tiny_backbone, TINY_CFG, SyntheticShapes(4, 64, seed=1), request()
    )
    other_dtype = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request(dtype="float32"))
    reseeded = make_backbone(BackboneConfig(**{**TINY_CFG, "init_seed": 1}))
    other_weights = get_or_build(tmp_path, reseeded, {**TINY_CFG, "init_seed": 1}, ds, request())
    folders = {c.path for c in (base, other_layer, other_seed, other_dtype, other_weights)}
    assert len(folders) == 5
    assert not torch.equal(other_weights.load_all(), base.load_all())


def test_damaged_shards_are_named_and_rebuilt_alone(tmp_path, tiny_backbone, monkeypatch):
    ds = SyntheticShapes(32, 64, seed=0)
    clean = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request()).load_all()
    path = next(p for p in tmp_path.iterdir() if p.is_dir())
    counter = CountingCapture(tiny_backbone, monkeypatch)

    # Truncated: found on every open, by size.
    shard = path / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(
        HsaeError, match=r"shard-00001\.npy has \d+ bytes.*truncated.*rerun train\.py"
    ):
        ActivationCache.open(path)
    # The advice works: delete the shard and the manifest, rerun: only that shard is redone.
    shard.unlink()
    (path / MANIFEST).unlink()
    rebuilt = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request())
    assert counter.n_images == 8
    torch.testing.assert_close(rebuilt.load_all(), clean)

    # One flipped byte: same size, so only a checksum finds it (cache.verify=true).
    shard = path / "shard-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    ActivationCache.open(path)  # sizes and shapes still agree
    with pytest.raises(HsaeError, match=r"shard-00002\.npy fails its checksum.*delete"):
        ActivationCache.open(path, verify=True)
    with pytest.raises(HsaeError, match=r"shard-00002\.npy fails its checksum"):
        get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request(verify=True))
    shard.unlink()
    (path / MANIFEST).unlink()
    fixed = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request(verify=True))
    assert counter.n_images == 16
    torch.testing.assert_close(fixed.load_all(), clean)

    (path / "shard-00003.npy").unlink()
    with pytest.raises(HsaeError, match=r"shard-00003\.npy is missing"):
        ActivationCache.open(path)


def test_a_resume_with_another_shard_size_recomputes_and_tidies(
    tmp_path, tiny_backbone, monkeypatch
):
    ds = SyntheticShapes(32, 64, seed=0)
    small = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request(shard_rows=4))
    assert len(small.shards) == 8
    (small.path / MANIFEST).unlink()  # as if killed just before the manifest
    counter = CountingCapture(tiny_backbone, monkeypatch)
    big = get_or_build(tmp_path, tiny_backbone, TINY_CFG, ds, request(shard_rows=16))
    assert big.path == small.path and counter.n_images == 32  # no receipt matched the layout
    assert sorted(p.name for p in big.path.glob("shard-*")) == [
        "shard-00000.json",
        "shard-00000.npy",
        "shard-00001.json",
        "shard-00001.npy",
    ]
    torch.testing.assert_close(big.load_all(), small.load_all())


def test_unreadable_images_are_skipped_counted_and_listed(tmp_path, tiny_backbone):
    root = image_folder(tmp_path / "imgs", {"a": 3, "b": 3}, prefix="train")
    image_folder(tmp_path / "imgs", {"a": 1, "b": 1}, prefix="val")
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    good = root / "train" / "b" / "img0.png"
    (root / "train" / "b" / "cut.png").write_bytes(good.read_bytes()[:60])  # truncated PNG
    write_image(root / "train" / "b" / "wide.png", seed=7, size=(90, 20))  # odd but readable
    ds = make_dataset(DatasetConfig(name="image_folder", path=str(root)), "train")
    names = [ds.image_name(i) for i in range(len(ds))]
    cache = get_or_build(tmp_path / "cache", tiny_backbone, TINY_CFG, ds, request(shard_rows=4))
    m = cache.manifest
    assert m["n_skipped"] == 2 and m["n_images"] == 9 and m["n_cached_images"] == 7
    assert sorted(s["file"] for s in m["skipped"]) == ["train/a/empty.png", "train/b/cut.png"]
    kept = [i for i, n in enumerate(names) if n not in ("train/a/empty.png", "train/b/cut.png")]
    assert cache.n_rows == 7 and cache.image_ids.tolist() == kept
    rows = np.arange(7)
    assert cache.row_image(rows).tolist() == kept
    np.testing.assert_array_equal(cache.row_labels(rows), ds.labels_nl[kept])
    # Each cached row is the image it claims to be.
    ds.transform = tiny_backbone.preprocess
    wide = names.index("train/b/wide.png")
    acts = tiny_backbone.capture(ds[wide][0][None], [2])[2][:, 0]
    torch.testing.assert_close(cache.read([kept.index(wide)]), acts, atol=2e-2, rtol=2e-2)

    strict = make_dataset(
        DatasetConfig(name="image_folder", path=str(root), on_error="raise"), "train"
    )
    with pytest.raises(HsaeError, match=r"cannot read image .*(empty|cut)\.png"):
        get_or_build(tmp_path / "strict", tiny_backbone, TINY_CFG, strict, request())


def test_disk_space_is_checked_before_building(tmp_path, tiny_backbone, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("hsae.cache.build.shutil.disk_usage", lambda _: usage(100, 90, 10))
    with pytest.raises(HsaeError, match=r"needs 0\.00 GB more .* free"):
        get_or_build(tmp_path, tiny_backbone, TINY_CFG, SyntheticShapes(4, 64), request())


def test_activation_file_as_a_cache_source(tmp_path):
    acts = np.random.default_rng(0).normal(size=(100, 16)).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    np.save(tmp_path / "labels.npy", np.arange(100) % 5)
    cfg = DatasetConfig(
        name="activations", path=str(tmp_path / "acts.npy"), labels=str(tmp_path / "labels.npy")
    )
    source = make_dataset(cfg, "train")
    cache = get_or_build(
        tmp_path / "c", None, None, source, request(dtype="float32", shard_rows=32)
    )
    assert cache.path.name.startswith("activations-train_acts_")
    assert cache.n_rows == len(source) == 90 and len(cache.shards) == 3
    rows = np.arange(cache.n_rows)
    np.testing.assert_array_equal(cache.row_image(rows), source.rows)
    torch.testing.assert_close(cache.load_all(), torch.from_numpy(acts[source.rows]))
    assert cache.row_labels(rows)[:, 0].tolist() == (source.rows % 5).tolist()
    val = get_or_build(
        tmp_path / "c", None, None, make_dataset(cfg, "val"), request(dtype="bfloat16")
    )
    assert val.n_rows == 10 and val.path != cache.path
    np.save(tmp_path / "acts.npy", acts + 1)  # new contents, new cache
    changed = get_or_build(
        tmp_path / "c", None, None, make_dataset(cfg, "train"), request(dtype="float32")
    )
    assert changed.path != cache.path


# ---- separate processes: a killed build resumes, concurrent builders build once --------


class ToyBackbone(Backbone):
    """Two conv layers: a real backbone that needs neither open_clip nor timm, so builder
    subprocesses start in a few seconds."""

    def __init__(self):
        self.name = "toy"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1)
            ).eval()
        self.pre = Preprocess((32, 32), (32,), "shortest", "bilinear", (0.5,) * 3, (0.5,) * 3)
        self.has_cls, self.n_prefix_tokens = False, 0

    def _named_layers(self):
        return [("0", self.model[0]), ("2", self.model[2])]

    def _run(self, images):
        self.model(images)

    def image_tower(self):
        return self.model


TOY_CFG = {"loader": "toy", "model_name": "toy", "pretrained": None}
TOY_REQUEST = CacheRequest(layer=1, tokens="mean", batch_size=8, shard_rows=8)

BUILDER = textwrap.dedent(
    """
    import os, sys, time

    import hsae.cache.build
    from hsae.cache import get_or_build
    from hsae.data import SyntheticShapes
    from tests.test_cache import TOY_CFG, TOY_REQUEST, ToyBackbone

    root, n_images, delay, marker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]


    class Slow(SyntheticShapes):  # same images and cache key, slower
        def __getitem__(self, i):
            time.sleep(delay)
            return super().__getitem__(i)


    build = hsae.cache.build._Builder.build_from_images


    def counted(self, *args, **kwargs):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\\n")
        return build(self, *args, **kwargs)


    hsae.cache.build._Builder.build_from_images = counted
    cache = get_or_build(root, ToyBackbone(), TOY_CFG, Slow(n_images, 64, 0), TOY_REQUEST)
    print(cache.path, cache.n_rows, flush=True)
    """
)


def start_builder(tmp_path: Path, root: Path, n_images: int, delay: float) -> subprocess.Popen:
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(root),
            str(n_images),
            str(delay),
            str(tmp_path / "built"),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_build_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    proc = start_builder(tmp_path, root, n_images=96, delay=0.03)
    deadline = time.monotonic() + 120
    while len(list(root.glob("*/shard-*.json"))) < 3:
        assert proc.poll() is None, f"the builder ended before it was killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "no shards after 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (path,) = [p for p in root.iterdir() if p.is_dir()]
    assert not (path / MANIFEST).exists()
    receipts = sorted(path.glob("shard-*.json"))
    n_finished = len(receipts)
    assert 3 <= n_finished < 12
    finished = [f for r in receipts for f in (r, r.with_suffix(".npy"))]
    stamps = {f.name: f.stat().st_mtime_ns for f in finished}

    backbone = ToyBackbone()
    counter = CountingCapture(backbone, monkeypatch)
    resumed = get_or_build(root, backbone, TOY_CFG, SyntheticShapes(96, 64), TOY_REQUEST)
    assert resumed.path == path
    assert counter.n_images == 96 - 8 * n_finished  # finished shards were not recomputed
    assert {f.name: f.stat().st_mtime_ns for f in finished} == stamps
    assert not list(path.glob(".*.tmp-*"))  # the killed writer's temporary file is gone
    assert sorted(p.name for p in path.glob("shard-*.npy")) == [
        sh["file"] for sh in resumed.manifest["shards"]
    ]
    clean = get_or_build(
        tmp_path / "clean", ToyBackbone(), TOY_CFG, SyntheticShapes(96, 64), TOY_REQUEST
    )
    assert clean.path.name == resumed.path.name
    torch.testing.assert_close(resumed.load_all(), clean.load_all(), atol=0, rtol=0)
    ActivationCache.open(resumed.path, verify=True)
    drop = {"build_seconds", "created"}
    assert {k: v for k, v in resumed.manifest.items() if k not in drop} == {
        k: v for k, v in clean.manifest.items() if k not in drop
    }


def test_two_concurrent_builders_build_one_cache_once(tmp_path):
    root = tmp_path / "cache"
    procs = [start_builder(tmp_path, root, n_images=48, delay=0.01) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    lines = [out.split() for out, _ in outputs]
    assert lines[0] == lines[1] and lines[0][1] == "48"
    assert len((tmp_path / "built").read_text().split()) == 1  # one of them built it
    cache = ActivationCache.open(lines[0][0], verify=True)
    assert cache.n_rows == 48 and len(cache.shards) == 6
    assert json.loads((Path(lines[0][0]) / MANIFEST).read_text())["n_rows"] == 48


# ---- keys: an existing cache keeps its folder ----------------------------------------


class FixedFingerprint(ToyBackbone):
    def fingerprint(self) -> str:
        return (
            "0123456789abcdef"  # the real one hashes weights, which torch versions may init apart
        )


@pytest.mark.parametrize(
    "tokens,name",
    [
        ("mean", "synthetic-train_toy_l1_mean_c2ae26c58bf25dbd"),
        ("cls", "synthetic-train_toy_l1_cls_85db72095eb33732"),
    ],
)
def test_cache_keys_are_pinned(tmp_path, tokens, name):
    """The folder names the key code gave before hsae.cache became a package: a changed key
    would silently rebuild every existing cache."""
    from hsae.cache.key import cache_dir_for, cache_spec

    spec = cache_spec(
        FixedFingerprint(), TOY_CFG, SyntheticShapes(10, 64, 0), request(layer=1, tokens=tokens)
    )
    assert cache_dir_for(tmp_path, spec, "toy") == tmp_path.resolve() / name


def test_activation_file_cache_key_is_pinned(tmp_path):
    np.save(tmp_path / "acts.npy", np.arange(40 * 4, dtype=np.float32).reshape(40, 4))
    source = make_dataset(
        DatasetConfig(name="activations", path=str(tmp_path / "acts.npy")), "train"
    )
    cache = get_or_build(tmp_path / "c", None, None, source, request(dtype="float32"))
    assert cache.path.name == "activations-train_acts_4420f8d9b0a30151"
    assert cache.manifest["key"] == "4420f8d9b0a30151"


def test_a_pickled_cache_is_its_folder_reopened(tmp_path):
    """ddp_spawn and spawned loader workers pickle the cache: it travels as its path, not as
    a copy of its shards, and reopens to the same rows."""
    import pickle

    acts = np.random.default_rng(0).normal(size=(4000, 32)).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    source = make_dataset(
        DatasetConfig(name="activations", path=str(tmp_path / "acts.npy")), "train"
    )
    cache = get_or_build(
        tmp_path / "c", None, None, source, request(dtype="float32", shard_rows=1000)
    )
    data = pickle.dumps(cache)
    shard_bytes = sum(s.nbytes for s in cache.shards)
    assert len(data) < 1000 < shard_bytes  # ~300 bytes vs ~460 kB of rows
    again = pickle.loads(data)
    assert isinstance(again, ActivationCache) and again.path == cache.path
    rows = np.arange(0, cache.n_rows, 7)
    torch.testing.assert_close(again.read(rows), cache.read(rows), rtol=0, atol=0)
