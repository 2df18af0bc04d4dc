"""Datasets: image folders (with a hierarchy file), CIFAR-100 in torchvision's format,
ImageNet folders with the shipped WordNet hierarchy, HierarCaps photos, activation files,
seeded subsets and unreadable images."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hsae.config import DatasetConfig, RunConfig, to_objects
from hsae.data import ActivationArray, ImageError, make_dataset
from hsae.data.files import IMAGENET_HIERARCHY, imagenet_hierarchy
from hsae.errors import HsaeError
from tests.conftest import HIERARCAPS_CSV, HIERARCAPS_IMAGES, HIERARCAPS_ROWS, ROOT, WORDNET_DIR


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, classes: dict[str, int], prefix: str = "") -> Path:
    for c, (name, n) in enumerate(classes.items()):
        for i in range(n):
            write_image(root / prefix / name / f"img{i}.png", seed=100 * c + i)
    return root


def cfg(**kw) -> DatasetConfig:
    return DatasetConfig(**kw)


# ---- image_folder --------------------------------------------------------------------


def test_image_folder_with_a_hierarchy_file(tmp_path):
    root = image_folder(tmp_path / "imgs", {"beagle": 3, "tabby": 2, "truck": 4}, prefix="train")
    image_folder(tmp_path / "imgs", {"beagle": 1, "tabby": 1, "truck": 1}, prefix="val")
    (tmp_path / "h.yaml").write_text(
        "levels: [domain, group, class]\n"
        "ancestors:\n"
        "  beagle: [animal, dog]\n"
        "  tabby: [animal, cat]\n"
        "  truck: [vehicle, road]\n"
    )
    train = make_dataset(
        cfg(name="image_folder", path=str(root), hierarchy=str(tmp_path / "h.yaml")), "train"
    )
    val = make_dataset(
        cfg(name="image_folder", path=str(root), hierarchy=str(tmp_path / "h.yaml")), "val"
    )
    assert len(train) == 9 and len(val) == 3
    h = train.hierarchy
    assert h.level_names == ("domain", "group", "class")
    assert h.class_names == (
        ("animal", "vehicle"),
        ("cat", "dog", "road"),
        ("beagle", "tabby", "truck"),
    )
    # beagle -> dog -> animal; truck -> road -> vehicle, at every level of every image.
    assert train.labels_nl[0].tolist() == [0, 1, 0]
    assert train.labels_nl[-1].tolist() == [1, 2, 2]
    assert train.image_name(0) == "train/beagle/img0.png"
    image, index = train[4]
    assert index == 4 and image.shape == (3, 30, 40) and image.min() >= 0 and image.max() <= 1


def test_image_folder_without_split_folders_holds_out_a_seeded_fraction(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 30, "b": 30})
    c = cfg(name="image_folder", path=str(root), val_fraction=0.25)
    train, val = make_dataset(c, "train"), make_dataset(c, "val")
    names_train = {train.image_name(i) for i in range(len(train))}
    names_val = {val.image_name(i) for i in range(len(val))}
    assert not names_train & names_val and len(names_train | names_val) == 60
    assert 5 <= len(val) <= 25
    assert train.hierarchy.level_names == ("class",) and train.hierarchy.n_leaves == 2
    # Adding a file changes the cache key but moves no other file between splits.
    before = train.describe()
    write_image(root / "a" / "img_new.png", seed=999)
    train2, val2 = make_dataset(c, "train"), make_dataset(c, "val")
    assert train2.describe() != before or val2.describe() != val.describe()
    assert names_val <= {val2.image_name(i) for i in range(len(val2))}


def test_describe_ignores_where_the_data_lives(tmp_path):
    image_folder(tmp_path / "one", {"a": 2, "b": 2})
    image_folder(tmp_path / "two", {"a": 2, "b": 2})
    one = make_dataset(cfg(name="image_folder", path=str(tmp_path / "one")), "train")
    two = make_dataset(cfg(name="image_folder", path=str(tmp_path / "two")), "train")
    assert one.describe() == two.describe()


def test_max_images_is_a_seeded_subset(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 20, "b": 20}, prefix="train")
    image_folder(tmp_path / "imgs", {"a": 1, "b": 1}, prefix="val")

    def names(seed):
        ds = make_dataset(
            cfg(name="image_folder", path=str(root), max_images=7, seed=seed), "train"
        )
        return [ds.image_name(i) for i in range(len(ds))]

    assert len(names(0)) == 7 and names(0) == names(0) and names(0) != names(1)
    assert names(0) == sorted(names(0))


def test_hierarchy_file_errors_name_the_class(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    bad = tmp_path / "h.json"
    bad.write_text(json.dumps({"levels": ["top", "class"], "ancestors": {"a": ["x"]}}))
    with pytest.raises(HsaeError, match=r"no ancestors for class folders \['b'\]"):
        make_dataset(cfg(name="image_folder", path=str(root), hierarchy=str(bad)), "train")
    bad.write_text(json.dumps({"levels": ["top", "class"], "ancestors": {"a": ["x"], "b": []}}))
    with pytest.raises(HsaeError, match="'b' has 0 ancestors"):
        make_dataset(cfg(name="image_folder", path=str(root), hierarchy=str(bad)), "train")


def test_unreadable_images_are_returned_as_errors_or_raise(tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 2}, prefix="train")
    image_folder(tmp_path / "imgs", {"a": 1}, prefix="val")
    (root / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    ds = make_dataset(cfg(name="image_folder", path=str(root)), "train")
    i = [ds.image_name(j) for j in range(len(ds))].index("train/a/broken.jpg")
    item, index = ds[i]
    assert isinstance(item, ImageError) and index == i and item.file == "train/a/broken.jpg"
    strict = make_dataset(cfg(name="image_folder", path=str(root), on_error="raise"), "train")
    with pytest.raises(HsaeError, match=r"broken\.jpg.*dataset\.on_error=skip"):
        strict[i]


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(HsaeError, match=r"needs dataset\.path"):
        make_dataset(cfg(name="image_folder"), "train")
    with pytest.raises(HsaeError, match="no class subfolders"):
        make_dataset(cfg(name="image_folder", path=str(tmp_path)), "train")
    with pytest.raises(HsaeError, match=r"download=True"):
        make_dataset(cfg(name="cifar100", path=str(tmp_path)), "train")
    with pytest.raises(HsaeError, match=r"dataset\.name='mnist'"):
        DatasetConfig(name="mnist")
    with pytest.raises(HsaeError, match=r"dataset\.on_error"):
        DatasetConfig(name="image_folder", on_error="ignore")


def test_every_dataset_config_composes_and_dispatches(compose, tmp_path):
    root = image_folder(tmp_path / "imgs", {"a": 10, "b": 10})
    run = to_objects(
        compose(["dataset=image_folder", f"dataset.path={root}", "dataset.val_fraction=0.5"]),
        RunConfig,
    )
    assert len(make_dataset(run.dataset, "train")) + len(make_dataset(run.dataset, "val")) == 20
    hierarcaps = to_objects(compose(["dataset=hierarcaps"]), RunConfig)
    assert hierarcaps.dataset.path.endswith("hierarcaps/images")


# ---- cifar100 ------------------------------------------------------------------------


def fake_cifar100(root: Path, n_train: int = 200, n_test: int = 100) -> Path:
    """torchvision's on-disk CIFAR-100 format, with random pixels; coarse = fine // 5."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        entry = {
            "filenames": [f"img{i}.png" for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return root


def test_cifar100_fine_and_coarse_labels(tmp_path):
    root = fake_cifar100(tmp_path)
    train = make_dataset(cfg(name="cifar100", path=str(root)), "train")
    val = make_dataset(cfg(name="cifar100", path=str(root)), "val")
    assert len(train) == 200 and len(val) == 100
    h = train.hierarchy
    assert h.level_names == ("superclass", "class") and h.n_classes(0) == 20 and h.n_leaves == 100
    assert h.parents[1][37] == 7
    assert train.labels_nl[137].tolist() == [7, 37]
    with open(root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)["data"][137].reshape(3, 32, 32)
    image, index = train[137]
    assert index == 137
    torch.testing.assert_close(image, torch.from_numpy(raw).float() / 255)
    small = make_dataset(cfg(name="cifar100", path=str(root), max_images=10, seed=3), "train")
    assert len(small) == 10 and small.image_name(0).startswith("train/")


# ---- imagenet ------------------------------------------------------------------------


def test_shipped_imagenet_hierarchy_has_the_standard_classes():
    import timm

    hierarchy, wnids = imagenet_hierarchy()
    timm_wnids = (
        (Path(timm.__file__).parent / "data/_info/imagenet_synsets.txt").read_text().split()
    )
    assert wnids == timm_wnids
    assert hierarchy.level_names == ("coarse", "middle", "fine", "class")
    assert [hierarchy.n_classes(level) for level in range(4)] == [10, 40, 166, 1000]
    paths = hierarchy.leaf_paths()
    names = hierarchy.class_names
    goldfish = wnids.index("n01443537")
    assert names[0][paths[goldfish, 0]] == "animal" and names[1][paths[goldfish, 1]] == "fish"
    # Nested: every fine group lies inside one middle group, and so on.
    for level in range(1, 4):
        for c in range(hierarchy.n_classes(level)):
            members = paths[paths[:, level] == c]
            assert len(set(members[:, level - 1].tolist())) == 1


def test_imagenet_hierarchy_file_is_what_the_script_makes():
    """From the WordNet 3.0 entries the script reads (tests/data/wordnet: the 1,808 synsets
    on the classes' hypernym paths, lines verbatim; a missing one stops the script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_imagenet_hierarchy", ROOT / "scripts" / "make_imagenet_hierarchy.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    made = script.build(WORDNET_DIR)
    assert made == json.loads(IMAGENET_HIERARCHY.read_text())


def test_imagenet_folder_labels(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        write_image(root / split / "n01443537" / f"{split}_1.JPEG", seed=1)  # goldfish
        write_image(root / split / "n04579432" / f"{split}_2.JPEG", seed=2)  # whistle
    train = make_dataset(cfg(name="imagenet", path=str(root)), "train")
    hierarchy, wnids = imagenet_hierarchy()
    assert train.labels_nl[:, -1].tolist() == [wnids.index("n01443537"), wnids.index("n04579432")]
    assert train.labels_nl.shape == (2, 4)
    assert train.hierarchy == hierarchy
    (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    (root / "val" / "not_a_synset").mkdir()
    with pytest.raises(HsaeError, match="not ImageNet-1k synsets"):
        make_dataset(cfg(name="imagenet", path=str(root)), "val")


# ---- hierarcaps ----------------------------------------------------------------------


def test_hierarcaps_photos_decode_and_preprocess(tiny_backbone):
    c = cfg(name="hierarcaps", path=str(HIERARCAPS_IMAGES), val_fraction=0.5, max_images=8)
    train, val = make_dataset(c, "train"), make_dataset(c, "val")
    assert len(train) == 8 and len(val) == 8
    full = [
        make_dataset(cfg(name="hierarcaps", path=str(HIERARCAPS_IMAGES)), s)
        for s in ("train", "val")
    ]
    # Every photo of the CSV in exactly one split; one class per distinct coarsest caption.
    names = [{f.name for f in split.files} for split in full]
    assert len(names[0]) + len(names[1]) == HIERARCAPS_ROWS and not names[0] & names[1]
    with open(HIERARCAPS_CSV, newline="") as f:
        concepts = {row["captions"].split(" => ")[0] for row in csv.DictReader(f)}
    assert full[0].hierarchy.level_names == ("concept",)
    assert set(full[0].hierarchy.class_names[0]) == concepts and len(concepts) < HIERARCAPS_ROWS
    # The label is the coarsest caption of the image's chain.
    assert len(train.captions[0]) == 4
    concept = train.hierarchy.class_names[0][train.labels_nl[0, 0]]
    assert concept == train.captions[0][0]
    image, _ = train[0]
    assert image.shape[0] == 3 and image.shape[1] > 100  # decoded, not resized
    train.transform = tiny_backbone.preprocess
    image, _ = train[1]
    assert image.shape == (3, 64, 64) and torch.isfinite(image).all()


# ---- activations ---------------------------------------------------------------------


def test_activations_npy_with_labels(tmp_path):
    acts = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    fine = np.arange(50) % 6
    np.save(tmp_path / "labels.npy", np.stack([fine // 3, fine], axis=1))
    c = cfg(
        name="activations", path=str(tmp_path / "acts.npy"), labels=str(tmp_path / "labels.npy")
    )
    train, val = make_dataset(c, "train"), make_dataset(c, "val")
    assert isinstance(train, ActivationArray) and train.d_model == 6
    assert len(train) + len(val) == 50 and not set(train.rows) & set(val.rows)
    np.testing.assert_array_equal(train.read_rows(train.rows[:4]), acts[train.rows[:4]])
    h = train.hierarchy
    assert h.level_names == ("level0", "level1") and h.parents[1] == (0, 0, 0, 1, 1, 1)
    assert train.describe() != val.describe()


def test_activations_safetensors_with_labels_and_val_file(tmp_path):
    from safetensors.torch import save_file

    acts = torch.randn(40, 5, dtype=torch.bfloat16)
    save_file({"acts": acts, "labels": torch.arange(40) % 4}, tmp_path / "a.safetensors")
    save_file({"acts": torch.randn(10, 5)}, tmp_path / "v.safetensors")
    c = cfg(
        name="activations",
        path=str(tmp_path / "a.safetensors"),
        val_path=str(tmp_path / "v.safetensors"),
    )
    train, val = make_dataset(c, "train"), make_dataset(c, "val")
    assert len(train) == 40 and len(val) == 10
    assert train.labels_nl[:, 0].tolist() == (np.arange(40) % 4).tolist()
    rows = np.array([0, 5, 4100 % 40, 39])
    np.testing.assert_array_equal(
        train.read_rows(np.sort(rows)), acts.float().numpy()[np.sort(rows)]
    )


def test_activation_file_errors(tmp_path):
    from safetensors.torch import save_file

    np.save(tmp_path / "flat.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(HsaeError, match=r"must be \[rows, d\]"):
        make_dataset(cfg(name="activations", path=str(tmp_path / "flat.npy")), "train")
    save_file({"a": torch.zeros(3, 2), "b": torch.zeros(3, 2)}, tmp_path / "two.safetensors")
    with pytest.raises(HsaeError, match=r"set dataset\.key"):
        make_dataset(cfg(name="activations", path=str(tmp_path / "two.safetensors")), "train")
    np.save(tmp_path / "ok.npy", np.zeros((10, 2), dtype=np.float32))
    np.save(tmp_path / "short.npy", np.zeros(9, dtype=np.int64))
    with pytest.raises(HsaeError, match=r"shape \[10\]"):
        make_dataset(
            cfg(
                name="activations",
                path=str(tmp_path / "ok.npy"),
                labels=str(tmp_path / "short.npy"),
            ),
            "train",
        )
    np.save(tmp_path / "tangled.npy", np.array([[0, 0], [1, 0]] * 5))
    with pytest.raises(HsaeError, match="two parents"):
        make_dataset(
            cfg(
                name="activations",
                path=str(tmp_path / "ok.npy"),
                labels=str(tmp_path / "tangled.npy"),
            ),
            "train",
        )
    with pytest.raises(HsaeError, match=r"needs dataset\.path"):
        make_dataset(cfg(name="activations"), "train")
