"""The CAST authors' checkpoint layouts load exactly; a wrong file fails with its keys."""

from __future__ import annotations

import pytest
import torch

from hsae.backbones.cast import CastBackbone, make_authors_vit
from hsae.backbones.cast.checkpoint import MOCO_PREFIX, authors_state_dict
from hsae.errors import HsaeError

pytestmark = pytest.mark.usefixtures("one_thread")

# Names as the authors' cast_models/cast.py (on timm's VisionTransformer) produce them.
AUTHORS_NAMES = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.0.weight",
    "patch_embed.proj.1.running_var",
    "patch_embed.proj.12.bias",
    "blocks.3.attn.qkv.weight",
    "blocks2.0.attn.qkv.weight",
    "blocks4.0.mlp.fc2.bias",
    "pool1.pool_block.centroid_fc.attn.qkv.weight",
    "pool1.pool_block.centroid_fc.bias",
    "pool3.pool_block.fc1.1.weight",
    "pool4.pool_block.fc2.0.bias",
    "norm.weight",
]


def _trained_like(seed: int, recipe: str) -> CastBackbone:
    source = CastBackbone("src", f"cast_tiny.{recipe}+slic", None, init_seed=seed)
    with torch.no_grad():  # every tensor distinct from a fresh init, BN statistics too
        for tensor in source.model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
    return source


@pytest.mark.parametrize("recipe", ["moco", "deit"])
def test_authors_layout_loads_exactly(tmp_path, recipe):
    source = _trained_like(1, recipe)
    file = tmp_path / "checkpoint.pth"
    torch.save(authors_state_dict(source.model.state_dict(), source.arch, recipe), file)
    saved = torch.load(file, weights_only=False)
    theirs = saved["state_dict"] if recipe == "moco" else saved["model"]
    prefix = MOCO_PREFIX if recipe == "moco" else ""
    for name in AUTHORS_NAMES:
        assert prefix + name in theirs, name
    assert (prefix + "pe_token" in theirs) == (recipe == "moco")

    loaded = CastBackbone("cast", f"cast_tiny.{recipe}+slic", str(file), init_seed=7)
    want, got = source.model.state_dict(), loaded.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_wrong_checkpoint_fails_with_the_keys(tmp_path):
    source = _trained_like(1, "moco")
    ckpt = authors_state_dict(source.model.state_dict(), source.arch, "moco")
    state = ckpt["state_dict"]
    state[MOCO_PREFIX + "pool2.pool_block.extra.weight"] = torch.zeros(3)
    del state[MOCO_PREFIX + "norm.bias"]
    file = tmp_path / "bad.pth.tar"
    torch.save(ckpt, file)
    with pytest.raises(HsaeError) as err:
        CastBackbone("cast", "cast_tiny.moco+slic", str(file))
    assert "pool2.pool_block.extra.weight" in str(err.value)
    assert "norm.bias" in str(err.value)
    # A checkpoint of another variant: shapes differ, named with both shapes.
    with pytest.raises(HsaeError, match="match nothing"):
        big = _trained_like(1, "moco")
        big_ckpt = authors_state_dict(big.model.state_dict(), big.arch, "moco")
        big_ckpt["state_dict"][MOCO_PREFIX + "cls_token"] = torch.zeros(1, 1, 384)
        torch.save(big_ckpt, file)
        CastBackbone("cast", "cast_tiny.moco+slic", str(file))
    # A DeiT file given to a MoCo config: the recipe mismatch is named.
    deit = authors_state_dict(source.model.state_dict(), source.arch, "deit")
    torch.save(deit, file)
    with pytest.raises(HsaeError, match=r"cast_tiny\.deit"):
        CastBackbone("cast", "cast_tiny.moco+slic", str(file))


def test_moco_vit_baseline_loads_from_the_moco_layout(tmp_path):
    source = make_authors_vit("vit", "vit_tiny_patch16_224.moco", None, init_seed=3)
    state = {MOCO_PREFIX + k: v + 0.01 for k, v in source.model.state_dict().items()}
    state[MOCO_PREFIX + "head.0.weight"] = torch.zeros(4, 192)
    state["module.momentum_encoder.cls_token"] = torch.zeros(1, 1, 192)
    file = tmp_path / "vit.pth.tar"
    torch.save({"epoch": 100, "state_dict": state}, file)
    loaded = make_authors_vit("vit", "vit_tiny_patch16_224.moco", str(file))
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[MOCO_PREFIX + key]), key
    assert loaded.pre.interpolation == "bilinear" and loaded.pre.resize == (256,)
    del state[MOCO_PREFIX + "norm.weight"]
    torch.save({"state_dict": state}, file)
    with pytest.raises(HsaeError, match=r"norm\.weight"):
        make_authors_vit("vit", "vit_tiny_patch16_224.moco", str(file))
