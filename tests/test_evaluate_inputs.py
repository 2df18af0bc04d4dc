"""What evaluation reads: the cache request built from the config (one constructor for
train.py and evaluate.py), and damaged run dirs, each refused with one clear error."""

from __future__ import annotations

import pytest

from hsae.cache import CacheRequest
from hsae.config import BackboneConfig, CacheConfig, DatasetConfig


class Captured(Exception):
    pass


def test_step1_passes_every_cache_setting_verify_included(monkeypatch, tmp_path):
    """``evaluate.py backbone=... cache.verify=true`` opens the cache with verify on."""
    import hsae.cache
    from hsae.evaluation import hierarchy_of_backbone

    seen = {}

    def capture(root, backbone, backbone_cfg, dataset, request):
        seen["request"] = request
        raise Captured

    monkeypatch.setattr(hsae.cache, "get_or_build", capture)
    backbone = BackboneConfig(name="tiny_vit", model_name="hsae-tiny-vit", d_model=128, layer=1)
    cache = CacheConfig(dir=str(tmp_path), verify=True, dtype="float32", shard_rows=4096,
                        batch_size=32, num_workers=0, device="cpu")  # fmt: skip
    with pytest.raises(Captured):
        hierarchy_of_backbone(
            backbone, DatasetConfig(name="synthetic", n_val=16), cache, "val", tmp_path, "cpu"
        )
    assert seen["request"] == CacheRequest(
        layer=1, tokens="cls", dtype="float32", shard_rows=4096, batch_size=32, num_workers=0,
        device="cpu", verify=True,
    )  # fmt: skip
    assert CacheRequest.from_config(backbone, cache) == seen["request"]


@pytest.fixture
def run_dir(tmp_path):
    """A run dir as train.py leaves it, with a small SAE (no cache needed to read it)."""
    import json

    from hsae.sae import TopKSAE, save_sae

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_sae(TopKSAE(d_model=8, n_latents=16, k=2), run_dir)
    cfg = {"sae": {}, "cache": {"val": str(tmp_path / "cache")}, "backbone": {}, "dataset": {}}
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_weights_file_is_one_clear_error(run_dir, damage):
    from hsae.errors import HsaeError
    from hsae.sae import load_sae

    path = run_dir / "sae.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a tensor file " * 50,
                      "empty": b""}[damage])  # fmt: skip
    with pytest.raises(HsaeError, match=r"sae\.safetensors") as error:
        load_sae(run_dir)
    assert "damaged" in str(error.value) and "train.py" in str(error.value)


def test_weights_of_another_shape_are_one_clear_error(run_dir):
    """The metadata's config and the tensors disagree (a file edited or mixed up)."""
    from safetensors.torch import load_file, save_file

    from hsae.errors import HsaeError
    from hsae.sae import load_sae

    path = run_dir / "sae.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["W_dec"] = tensors["W_dec"][:4]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(HsaeError, match=r"sae\.safetensors.*W_dec"):
        load_sae(run_dir)


@pytest.mark.parametrize("damage", ["missing_key", "not_json", "not_a_dict"])
def test_a_damaged_cfg_json_is_one_clear_error(run_dir, damage):
    import json

    from hsae.errors import HsaeError
    from hsae.evaluation import read_run_cfg

    path = run_dir / "cfg.json"
    cfg = json.loads(path.read_text())
    del cfg["cache"]
    path.write_text({"missing_key": json.dumps(cfg), "not_json": '{"cache": {',
                     "not_a_dict": "[1, 2]"}[damage])  # fmt: skip
    with pytest.raises(HsaeError, match=r"cfg\.json") as error:
        read_run_cfg(run_dir)
    assert "train.py" in str(error.value)
    if damage == "missing_key":
        assert "'cache'" in str(error.value)


@pytest.mark.parametrize("content", ["garbage", "truncated", "runs_code", "not_lightning"])
def test_a_last_ckpt_that_is_not_a_checkpoint_is_one_clear_error(tmp_path, content):
    from pathlib import PurePosixPath

    import torch

    from hsae.errors import HsaeError
    from hsae.training.run import check_checkpoint

    path = tmp_path / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    good = {"state_dict": {"w": torch.zeros(64)}, "epoch": 0}
    torch.save(good, path)
    whole = path.read_bytes()
    if content == "garbage":
        path.write_bytes(b"\x00\x01 not a checkpoint" * 10)
    elif content == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif content == "runs_code":  # a class to import: weights-only loading refuses it
        torch.save({**good, "path": PurePosixPath("a")}, path)
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(HsaeError, match=r"last\.ckpt") as error:
        check_checkpoint(path)
    assert "delete it" in str(error.value)
    torch.save(good, path)
    check_checkpoint(path)  # a checkpoint passes
