"""What a backbone declares about itself (issue #12): its token layout without activations,
and whether it builds segment trees / segment tokens, so callers ask instead of type-checking."""

from __future__ import annotations

import pytest
import torch

from hsae.backbones.cast import CastBackbone
from hsae.errors import HsaeError


@pytest.fixture(scope="module")
def tiny_cast() -> CastBackbone:
    return CastBackbone("cast_tiny", "cast_tiny+slic", None, init_seed=0)


def test_token_index_equals_the_index_select_returns(tiny_backbone, tiny_cast):
    # The cache builder records token_index before the first batch; it must be exactly the
    # index select returns on real activations (cache rows and keys depend on it).
    cases = [(tiny_backbone, t) for t in ("cls", "patch", "mean", "all")]
    cases += [(tiny_cast, t) for t in ("cls", "mean")]
    for backbone, tokens in cases:
        for info in backbone.layers():
            acts = torch.randn(2, info.n_tokens, info.d_model)
            _, from_select = backbone.select(acts, tokens)
            declared = backbone.token_index(info.n_tokens, tokens)
            assert declared.dtype == from_select.dtype
            assert torch.equal(declared, from_select), (backbone.name, tokens, info.name)


def test_token_index_rejects_what_select_rejects(tiny_backbone, tiny_cast):
    with pytest.raises(HsaeError, match="for CAST: valid are"):
        tiny_cast.token_index(5, "patch")
    with pytest.raises(HsaeError, match="is not valid"):
        tiny_backbone.token_index(5, "pixels")


def test_segment_capabilities_are_declared(tiny_backbone, tiny_cast):
    assert tiny_backbone.segment_tree_forward() is None
    assert not tiny_backbone.has_segment_tokens
    with pytest.raises(HsaeError, match="no segment tokens"):
        tiny_backbone.capture_segments(torch.zeros(1, 3, 8, 8), 0)
    assert tiny_cast.has_segment_tokens
    assert tiny_cast.segment_tree_forward() == tiny_cast.forward
