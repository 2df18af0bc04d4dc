"""CAST: forward shapes and token counts, graph pooling, farthest-point sampling, SLIC."""

from __future__ import annotations

import itertools

import pytest
import torch

from hsae.backbones.cast import VARIANTS, CastBackbone, CastModel
from hsae.backbones.cast.ops import farthest_point_sampling, segment_mean
from hsae.backbones.cast.superpixels import superpixels
from hsae.data.synthetic import SyntheticShapes
from hsae.errors import HsaeError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> CastBackbone:
    return CastBackbone("cast_tiny", "cast_tiny+slic", None, init_seed=0)


@pytest.fixture(scope="module")
def batch(tiny) -> torch.Tensor:
    data = SyntheticShapes(6, image_size=64, seed=3)
    return tiny.normalize(torch.stack([tiny.resize_crop(data.render(i)) for i in range(6)]))


def test_forward_shapes_token_counts_and_assignments(tiny, batch):
    arch = tiny.arch
    out = tiny.forward(batch)
    assert out.embedding_bd.shape == (6, arch.embed_dim)
    assert out.segments_bhw.shape == (6, arch.grid, arch.grid)
    n_stage1 = out.assignments[0].shape[1]
    assert n_stage1 == int(batch[:, 3].max()) + 1  # padded to the batch's largest id
    # Token counts stage by stage: superpixels -> 16 -> 8 -> 4 -> 2.
    sizes = [a.shape[1:] for a in out.assignments]
    assert sizes == [(n_stage1, 16), (16, 8), (8, 4), (4, 2)]
    for pad, assign in zip(out.padding, out.assignments, strict=True):
        sums = assign.sum(-1)
        torch.testing.assert_close(sums[~pad], torch.ones_like(sums[~pad]))
        assert (sums[pad] == 0).all()  # padded tokens are assigned nowhere
    # Each image's real segments are the superpixels that cover a stem-grid cell.
    for i in range(6):
        real = (~out.padding[0][i]).sum()
        assert real == out.segments_bhw[i].unique().numel()
    # The captured layers have those token counts (plus the class token).
    acts = tiny.capture(batch, list(range(4)))
    assert [a.shape[1] for a in acts.values()] == [1 + n_stage1, 17, 9, 5]
    rows, trees = tiny.capture_segments(batch, 0)
    assert len(rows.rows_nd) == int((~out.padding[0]).sum())
    assert torch.isfinite(rows.rows_nd).all()
    assert [p.shape[1] for p in trees.parents] == [n_stage1, 16, 8, 4]
    for parents, n_next in zip(trees.parents, [16, 8, 4, 2], strict=True):
        assert parents.max() < n_next and (parents >= -1).all()


def test_padding_is_masked_so_images_do_not_depend_on_their_batch(tiny, batch):
    # An image alone and in a batch with more superpixels: same embedding.
    alone = tiny.forward(batch[:1]).embedding_bd
    together = tiny.forward(batch).embedding_bd[:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_cast_s_variants_build_with_the_papers_sizes():
    small = CastModel(VARIANTS["cast_small"])
    assert len(small.blocks()) == 11 and small.pos_embed.shape == (1, 28 * 28, 384)
    assert len(CastModel(VARIANTS["cast_small_deep"]).blocks()) == 15
    assert VARIANTS["cast_base"].embed_dim == 768
    assert [s.pool.n_clusters for s in small.stages] == [64, 32, 16, 8]


def test_cast_rejects_rgb_only_input_and_patch_tokens(tiny):
    with pytest.raises(HsaeError, match="superpixel"):
        tiny.capture(torch.zeros(1, 3, 64, 64), [0])
    with pytest.raises(HsaeError, match="segments"):
        tiny.select(torch.zeros(1, 5, 128), "patch")


def _fps_brute_force(points_nd: torch.Tensor, n_samples: int, start: int) -> list[int]:
    chosen = [start]
    for _ in range(n_samples - 1):
        best, best_gap = -1, -1.0
        for j in range(len(points_nd)):
            gap = min(float(((points_nd[j] - points_nd[c]) ** 2).sum()) for c in chosen)
            if gap > best_gap:  # strict: ties keep the lowest index
                best, best_gap = j, gap
        chosen.append(best)
    return chosen


def test_farthest_point_sampling_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(3, 40, 5, generator=generator, dtype=torch.float64)
    points[1, 20:] = points[1, :20]  # duplicates: ties
    got = farthest_point_sampling(points, 12, start=2)
    for b in range(3):
        assert got[b].tolist() == _fps_brute_force(points[b], 12, 2)
    # Excluded points are never chosen; when the rest run out, chosen ones repeat.
    exclude = torch.zeros(1, 6, dtype=torch.bool)
    exclude[0, 3:] = True
    few = farthest_point_sampling(torch.randn(1, 6, 2, dtype=torch.float64), 5, 0, exclude)
    assert set(few[0].tolist()) <= {0, 1, 2}


def test_segment_mean_against_a_loop():
    x = torch.randn(2, 10, 3)
    labels = torch.tensor([[0, 0, 1, 1, 1, 3, 3, 3, 3, 0], [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]])
    means, counts = segment_mean(x, labels, 4)
    for b, s in itertools.product(range(2), range(4)):
        sel = labels[b] == s
        assert counts[b, s] == sel.sum()
        expected = x[b][sel].mean(0) if sel.any() else torch.zeros(3)
        torch.testing.assert_close(means[b, s], expected)


def test_slic_segments_cover_every_pixel():
    image = SyntheticShapes(1, image_size=224, seed=0).render(0)
    labels = superpixels(image, 196, "slic")
    assert labels.shape == (224, 224) and labels.min() == 0
    n = int(labels.max()) + 1
    assert torch.bincount(labels.flatten(), minlength=n).min() > 0  # ids 0..n-1 all used
    assert 98 <= n <= 300  # about the 196 asked for
