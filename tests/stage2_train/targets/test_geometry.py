"""Token grids under student cells: area / bilinear weights, the store's token geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_train.targets.geometry import TokenGrid, cache_window

# ------------------------------------------------------------------------------------------ cache_window


@pytest.mark.parametrize("mapping", ["area", "bilinear"])
def test_cache_window_token_aligned_is_the_stored_tokens(mapping):
    feats = torch.randn(3, 5, 6, 7)
    out = cache_window(feats, (16, 32), (48, 32), (16.0, 16.0), mapping)
    assert out.shape == (3, 3, 2, 7) and out.dtype == torch.float32
    torch.testing.assert_close(out, feats[:, 1:4, 2:4], rtol=0, atol=0)


@pytest.mark.parametrize("mapping", ["area", "bilinear"])
def test_cache_window_whole_slice_is_the_grid(mapping):
    feats = np.random.default_rng(0).normal(size=(2, 4, 4, 5)).astype(np.float16)
    out = cache_window(feats, (0, 0), (64, 64), (16.0, 16.0), mapping)
    torch.testing.assert_close(out, torch.from_numpy(feats.astype(np.float32)), rtol=0, atol=0)


def test_cache_window_half_token_area_is_the_neighbour_mean():
    feats = torch.randn(1, 4, 4, 3)
    out = cache_window(feats, (8, 0), (16, 16), (16.0, 16.0), "area")
    torch.testing.assert_close(out[0, 0, 0], (feats[0, 0, 0] + feats[0, 1, 0]) / 2)
    out = cache_window(feats, (8, 24), (16, 16), (16.0, 16.0), "area")  # half a token on both axes
    torch.testing.assert_close(out[0, 0, 0], feats[0, 0:2, 1:3].mean((0, 1)))
    # bilinear samples the cell centre (pixel 16 = the border between tokens 0 and 1): the same mean
    out = cache_window(feats, (8, 0), (16, 16), (16.0, 16.0), "bilinear")
    torch.testing.assert_close(out[0, 0, 0], (feats[0, 0, 0] + feats[0, 1, 0]) / 2)


def test_cache_window_area_equals_bilinear_for_16px_tokens():
    # a 16 px cell over 16 px tokens overlaps two tokens exactly by the bilinear weights of its centre
    feats = torch.randn(2, 6, 5, 4)
    for offset in ((0, 0), (5, 11), (13, 3), (32, 16)):
        area = cache_window(feats, offset, (48, 64), (16.0, 16.0), "area")
        torch.testing.assert_close(area, cache_window(feats, offset, (48, 64), (16.0, 16.0), "bilinear"))


def test_cache_window_fractional_tokens_and_errors():
    feats = torch.randn(1, 2, 2, 3)  # 2 x 2 tokens over a 48 x 48 slice: 24 px per token
    out = cache_window(feats, (0, 0), (48, 48), (24.0, 24.0), "area")
    f = feats[0]
    torch.testing.assert_close(out[0, 0, 0], f[0, 0])  # pixels [0, 16) lie in token 0
    torch.testing.assert_close(out[0, 2, 2], f[1, 1])  # pixels [32, 48) lie in token 1
    torch.testing.assert_close(out[0, 1, 1], f.mean((0, 1)))  # [16, 32): 8 px of each token
    torch.testing.assert_close(out[0, 0, 1], (f[0, 0] + f[0, 1]) / 2)
    with pytest.raises(ValueError, match="multiples of 16"):
        cache_window(feats, (0, 0), (40, 48), (24.0, 24.0), "area")
    with pytest.raises(ValueError, match="outside"):
        cache_window(feats, (16, 0), (48, 48), (24.0, 24.0), "area")
    with pytest.raises(ValueError, match="mapping"):
        cache_window(feats, (0, 0), (48, 48), (24.0, 24.0), "nearest")


def test_flipped_crop_reads_the_mirrored_tokens():
    tokens = torch.randn(2, 4, 4, 3)
    grid = TokenGrid(tokens, (16.0, 0.0), (16.0, 16.0))
    flipped = grid.cells((32, 48), (True, True), "area")
    torch.testing.assert_close(flipped, torch.flip(tokens[:, 1:3, 0:3], [1, 2]))
