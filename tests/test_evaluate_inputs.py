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
