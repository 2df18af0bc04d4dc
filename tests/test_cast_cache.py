"""Variable token counts in the activation cache: CAST's segment tokens and trees round-trip."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hsae.backbones import make_backbone
from hsae.backbones.cast import CastBackbone
from hsae.cache import ActivationCache, CacheRequest, get_or_build
from hsae.config import BackboneConfig
from hsae.data import SyntheticShapes
from hsae.errors import HsaeError

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = {"loader": "cast", "model_name": "cast_tiny+slic", "pretrained": None}


@pytest.fixture(scope="module")
def tiny() -> CastBackbone:
    return CastBackbone("cast_tiny", "cast_tiny+slic", None, init_seed=0)


@pytest.mark.parametrize("layer", [0, 2])
def test_segment_tokens_and_trees_round_trip(tmp_path, tiny, layer):
    n_tokens = tiny.layers()[layer].n_tokens
    data = SyntheticShapes(7, image_size=64, seed=5)
    # 3 images per batch and about 2 per shard: batches of different widths, many shards.
    req = CacheRequest(
        layer=layer, tokens="segments", dtype="float32", shard_rows=2 * n_tokens, batch_size=3
    )
    cache = get_or_build(tmp_path, tiny, CFG, data, req)
    assert cache.manifest["tokens_per_image"] is None
    assert len(cache.manifest["shards"]) > 2
    assert not list(cache.path.glob("ragged-*"))  # joined into row_index.npy / segment_trees.npz

    # The same images one at a time, straight through the model: equal rows, index, trees.
    reopened = ActivationCache.open(cache.path, verify=True)
    trees = reopened.segment_trees()
    rows = np.arange(reopened.n_rows)
    images = torch.stack([tiny.resize_crop(data.render(i)) for i in range(7)])
    want_rows, want_image, want_token = [], [], []
    for i in range(7):
        seg, tree = tiny.capture_segments(tiny.normalize(images[i : i + 1]), layer)
        want_rows.append(seg.rows_nd)
        want_image += [i] * len(seg.rows_nd)
        want_token += seg.token_n.tolist()
        assert (trees.segments[i] == tree.segments_bhw[0].numpy()).all()
        for k, parents in enumerate(tree.parents):
            stored = trees.parents[k][i]
            assert (stored[: parents.shape[1]] == parents[0].numpy()).all()
            assert (stored[parents.shape[1] :] == -1).all()  # batch padding
    torch.testing.assert_close(reopened.read(rows), torch.cat(want_rows), atol=1e-4, rtol=1e-4)
    assert reopened.row_image(rows).tolist() == want_image
    assert reopened.row_token(rows).tolist() == want_token
    counts = np.bincount(reopened.row_image(rows))
    if layer == 0:  # superpixels: a different count per image
        assert len(set(counts.tolist())) > 1
    else:  # stage 3: 8 clusters each
        assert (counts == 8).all()
    # Each image's levels nest: a coarser level is a function of the finer one.
    levels = trees.levels(3)
    assert [lv.shape for lv in levels] == [(8, 8)] * 5
    for fine, coarse in itertools.pairwise(levels):
        for s in np.unique(fine):
            assert len(np.unique(coarse[fine == s])) == 1
    assert len(np.unique(levels[-1])) <= 2


def test_fixed_token_caches_keep_their_layout(tmp_path, tiny):
    data = SyntheticShapes(4, image_size=64, seed=5)
    cache = get_or_build(tmp_path, tiny, CFG, data, CacheRequest(layer=1, tokens="cls"))
    assert cache.manifest["tokens_per_image"] == 1 and cache.row_index is None
    assert cache.row_image(np.arange(4)).tolist() == [0, 1, 2, 3]
    with pytest.raises(HsaeError, match="segment trees"):
        cache.segment_trees()


def test_segments_need_a_segment_backbone(tmp_path):
    backbone = make_backbone(
        BackboneConfig(
            name="tiny_vit", loader="open_clip", model_name="hsae-tiny-vit", d_model=128, layer=1
        )
    )
    data = SyntheticShapes(2, image_size=64)
    spec = {"loader": "open_clip", "model_name": "hsae-tiny-vit", "pretrained": None}
    with pytest.raises(HsaeError, match="tokens=segments"):
        get_or_build(tmp_path, backbone, spec, data, CacheRequest(layer=1, tokens="segments"))


def test_step3_image_pass_on_segment_tokens(tmp_path, tiny):
    """Step 3 on a ragged cache: each image's code is the maximum over its own segments and
    its features the mean of its own rows, however many segments it has."""
    from hsae.evaluation.inputs import image_features, image_pass
    from hsae.sae import TopKSAE

    data = SyntheticShapes(7, image_size=64, seed=5)
    req = CacheRequest(layer=0, tokens="segments", dtype="float32", shard_rows=64, batch_size=3)
    cache = get_or_build(tmp_path, tiny, CFG, data, req)
    rows = np.arange(cache.n_rows)
    image_r = cache.row_image(rows)
    assert len(set(np.bincount(image_r).tolist())) > 1  # a different count per image
    sae = TopKSAE(d_model=cache.d_model, n_latents=32, k=4).eval()
    # A batch smaller than one image's rows still takes whole images, one at a time.
    for batch_size in (5, 10_000):
        got = image_pass(sae, cache, batch_size=batch_size, device=torch.device("cpu"))
        x = cache.read(rows)
        codes = sae(x).codes
        for i in range(7):
            own = torch.as_tensor(image_r == i)
            torch.testing.assert_close(got.acts_ik[i], codes[own].amax(dim=0))
            torch.testing.assert_close(got.feats_id[i], x[own].mean(dim=0))
        assert got.image_ids.tolist() == list(range(7))
        assert got.moran_k is None
    feats, image_ids = image_features(cache)
    torch.testing.assert_close(feats, got.feats_id)
    assert image_ids.tolist() == list(range(7))
