"""Tests of the grid average pooling (strategies/downsample.py), with hand-worked values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokcomp.strategies.downsample import bin_index, downsample_grid
from tokcomp.strategies.oim import init_grid_state, oim_merge_lines


def _state(x: torch.Tensor):
    size, pos, owner = init_grid_state(*x.shape[:2])
    return x, size, pos, owner


def _assert_partition(owner: torch.Tensor, size: torch.Tensor, n_orig: int) -> None:
    h, w = size.shape
    assert owner.shape == (n_orig,)
    counts = torch.bincount(owner, minlength=h * w)
    assert counts.numel() == h * w and bool((counts >= 1).all())
    assert torch.equal(counts.to(size.dtype), size.flatten())


def test_4x4_to_2x2_by_hand():
    x = torch.arange(16.0).view(4, 4, 1)
    out_x, size, pos, owner = downsample_grid(*_state(x), 2, 2)
    # Quadrant means: (0+1+4+5)/4, (2+3+6+7)/4, (8+9+12+13)/4, (10+11+14+15)/4.
    assert torch.equal(out_x[..., 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.equal(size, torch.full((2, 2), 4.0))
    assert torch.equal(pos, torch.tensor([[[0.5, 0.5], [0.5, 2.5]], [[2.5, 0.5], [2.5, 2.5]]]))
    assert owner.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_divisible_case_equals_adaptive_avg_pool():
    x = torch.randn(6, 9, 5)
    out_x = downsample_grid(*_state(x), 3, 3)[0]
    ref = F.adaptive_avg_pool2d(x.permute(2, 0, 1), (3, 3)).permute(1, 2, 0)
    torch.testing.assert_close(out_x, ref)


def test_bins_partition_when_not_divisible():
    # 5 -> 3: boundaries floor(i * 5 / 3) = 0, 1, 3, 5.
    assert bin_index(5, 3).tolist() == [0, 1, 1, 2, 2]
    assert bin_index(7, 7).tolist() == list(range(7))
    assert bin_index(4, 1).tolist() == [0, 0, 0, 0]
    x = torch.arange(5.0).view(1, 5, 1)
    out_x, size, _, owner = downsample_grid(*_state(x), 1, 3)
    assert out_x[0, :, 0].tolist() == [0.0, 1.5, 3.5]
    assert size.tolist() == [[1.0, 2.0, 2.0]]
    assert owner.tolist() == [0, 1, 1, 2, 2]


def test_uniform_grid_stays_uniform_and_sizes_sum():
    v = torch.tensor([1.25, -3.0, 0.1])
    x = v.expand(7, 10, 3).clone()
    out_x, size, _, owner = downsample_grid(*_state(x), 4, 6, multiple=2)
    torch.testing.assert_close(out_x, v.expand(4, 6, 3), rtol=0, atol=1e-6)
    assert float(size.sum()) == 70.0
    _assert_partition(owner, size, 70)


def test_after_oim_sizes_and_positions_are_weighted():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 8, 4, generator=g, dtype=torch.float64)
    state = oim_merge_lines(*_state(x0), None, "width", 2)
    out_x, size, pos, owner = downsample_grid(*state, 3, 3, weighted=True)
    _assert_partition(owner, size, 48)
    _, pos0, _ = init_grid_state(6, 8, dtype=torch.float64)
    for token in range(9):
        covered = owner == token
        torch.testing.assert_close(out_x.view(9, 4)[token], x0.view(48, 4)[covered].mean(dim=0))
        torch.testing.assert_close(pos.view(9, 2)[token].double(), pos0.view(48, 2)[covered].mean(dim=0))
    # Unweighted: the plain mean of the merged tokens in the bin, whatever their sizes.
    plain = downsample_grid(*state, 3, 3)[0]
    torch.testing.assert_close(plain[0, 0], state[0][0:2, 0:2].reshape(4, 4).mean(dim=0))


def test_same_size_returns_inputs():
    state = _state(torch.randn(4, 4, 2))
    out = downsample_grid(*state, 4, 4)
    assert all(a is b for a, b in zip(out, state))


@pytest.mark.parametrize(
    ("out_h", "out_w", "multiple", "match"),
    [(0, 2, 1, "out_h"), (2, 5, 1, "out_w"), (3, 2, 2, "divisible"), (2, -1, 1, "out_w")],
)
def test_invalid_targets(out_h, out_w, multiple, match):
    with pytest.raises(ValueError, match=match):
        downsample_grid(*_state(torch.randn(4, 4, 2)), out_h, out_w, multiple)
