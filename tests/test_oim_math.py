"""Tests of the OIM tensor functions (strategies/oim.py).

Oracles: hand-worked grids, and a deliberately naive pure-Python loop implementation of one iteration
written from the specification (``_naive_iteration``), plus invariants that hold for any correct merge
(each token's value is the mean of the original values it covers, its position the mean of their
coordinates, its size their count).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokcomp.strategies.oim import init_grid_state, oim_merge_lines, oim_merge_pairs, rate_to_r

# ---------------------------------------------------------------------------------------------------------
# helpers


def _state(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = x.shape[:2]
    size, pos, owner = init_grid_state(h, w)
    return x, size, pos, owner


def _assert_partition(owner: torch.Tensor, size: torch.Tensor, n_orig: int) -> None:
    """Every original patch has one owner in range, every token owns >= 1 patch, sizes count them."""
    h, w = size.shape
    assert owner.shape == (n_orig,)
    assert owner.dtype == torch.long
    assert int(owner.min()) >= 0 and int(owner.max()) < h * w
    counts = torch.bincount(owner, minlength=h * w)
    assert bool((counts >= 1).all()), "a current token owns no original patch"
    assert torch.equal(counts.to(torch.float32), size.flatten().to(torch.float32))


def _expected_from_owner(values: torch.Tensor, owner: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Mean of the original ``values`` (n_orig, c) over the patches each current token owns (loop)."""
    out = torch.zeros(h * w, values.shape[1], dtype=torch.float64)
    for token in range(h * w):
        out[token] = values[owner == token].to(torch.float64).mean(dim=0)
    return out.view(h, w, -1)


def _cos(u: list[float], v: list[float]) -> float:
    nu = math.sqrt(sum(a * a for a in u))
    nv = math.sqrt(sum(b * b for b in v))
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def _naive_iteration(x, size, pos, owner, metric, axis, r, multiple, mode):
    """Loop implementation of one OIM iteration, from the specification text only."""
    h, w = len(x), len(x[0])
    # (line, along) -> (row, col): lines are columns for "width" and rows for "height".
    if axis == "width":
        n_lines, n_along = w, h

        def at(line, along):
            return along, line
    else:
        n_lines, n_along = h, w

        def at(line, along):
            return line, along

    def cell(grid, line, along):
        i, j = at(line, along)
        return grid[i][j]

    # dest[along][line] = line the token goes to, for every "along" position.
    if mode == "lines":
        m = multiple
        g = n_lines // m
        r_super = min(r // m, math.ceil(g / 2)) if g >= 2 else 0
        sim = []
        for s in range(g - 1):
            vals = [
                _cos(cell(metric, s * m + k, a), cell(metric, (s + 1) * m + k, a))
                for a in range(n_along)
                for k in range(m)
            ]
            sim.append(sum(vals) / len(vals))
        cands = []
        for s in range(0, g, 2):
            left = sim[s - 1] if s >= 1 else -math.inf
            right = sim[s] if s + 1 < g else -math.inf
            cands.append((right, s, s + 1) if right >= left else (left, s, s - 1))
        cands.sort(key=lambda c: -c[0])  # stable: ties keep the lower index first
        line_dest = list(range(n_lines))
        for _, s, d in cands[:r_super]:
            for k in range(m):
                line_dest[s * m + k] = d * m + k
        dest = [list(line_dest) for _ in range(n_along)]
    else:
        r_eff = min(r, math.ceil(n_lines / 2), n_lines - multiple) // multiple * multiple
        r_eff = max(r_eff, 0)
        dest = []
        for a in range(n_along):
            sim = [_cos(cell(metric, j, a), cell(metric, j + 1, a)) for j in range(n_lines - 1)]
            cands = []
            for j in range(0, n_lines, 2):
                left = sim[j - 1] if j >= 1 else -math.inf
                right = sim[j] if j + 1 < n_lines else -math.inf
                cands.append((right, j, j + 1) if right >= left else (left, j, j - 1))
            cands.sort(key=lambda c: -c[0])
            row_dest = list(range(n_lines))
            for _, j, d in cands[:r_eff]:
                row_dest[j] = d
            dest.append(row_dest)

    # Merge: every survivor (dest == itself) collects itself and its sources.
    new_lines = None
    out = {}
    for a in range(n_along):
        survivors = [j for j in range(n_lines) if dest[a][j] == j]
        new_lines = len(survivors)
        for new_j, j in enumerate(survivors):
            members = [k for k in range(n_lines) if dest[a][k] == j]
            s_tot = sum(cell(size, k, a) for k in members)
            xv = [
                sum(cell(size, k, a) * cell(x, k, a)[c] for k in members) / s_tot for c in range(len(x[0][0]))
            ]
            pv = [sum(cell(size, k, a) * cell(pos, k, a)[c] for k in members) / s_tot for c in range(2)]
            for k in members:
                out[(a, k)] = (new_j,)
            out[("val", a, new_j)] = (xv, s_tot, pv)
    if axis == "width":
        new_h, new_w = h, new_lines
    else:
        new_h, new_w = new_lines, w
    new_x = [[None] * new_w for _ in range(new_h)]
    new_size = [[None] * new_w for _ in range(new_h)]
    new_pos = [[None] * new_w for _ in range(new_h)]
    for a in range(n_along):
        for new_j in range(new_lines):
            xv, s_tot, pv = out[("val", a, new_j)]
            i, j = at(new_j, a)
            new_x[i][j], new_size[i][j], new_pos[i][j] = xv, s_tot, pv
    new_owner = []
    for p in owner:
        i, j = divmod(p, w)
        line, along = (j, i) if axis == "width" else (i, j)
        (new_line,) = out[(along, line)]
        ni, nj = at(new_line, along)
        new_owner.append(ni * new_w + nj)
    return new_x, new_size, new_pos, new_owner


def _run_both(x, size, pos, owner, metric, axis, r, multiple, mode):
    fn = oim_merge_lines if mode == "lines" else oim_merge_pairs
    got = fn(x, size, pos, owner, metric, axis, r, multiple)
    exp = _naive_iteration(
        x.tolist(), size.tolist(), pos.tolist(), owner.tolist(), metric.tolist(), axis, r, multiple, mode
    )
    return got, exp


# ---------------------------------------------------------------------------------------------------------
# hand-worked examples


def test_hand_worked_2x4_width_r1_merges_columns_2_and_3():
    # Metric columns e1, e2, (1,1), (1,1): sim(0,1)=0, sim(1,2)=0.707, sim(2,3)=1.
    # A-line 0 can only pick 1 (sim 0); A-line 2 picks 3 (1 > 0.707); the best match, 2 -> 3, merges.
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]).expand(2, 4, 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0], [10.0, 20.0, 30.0, 50.0]])[..., None]
    x, size, pos, owner = oim_merge_lines(*_state(x), metric, "width", r=1)
    assert torch.equal(x[..., 0], torch.tensor([[1.0, 2.0, 4.0], [10.0, 20.0, 40.0]]))
    assert torch.equal(size, torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]]))
    assert torch.equal(pos[0], torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.5]]))
    assert torch.equal(pos[1], torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.5]]))
    assert owner.tolist() == [0, 1, 2, 2, 3, 4, 5, 5]


def test_hand_worked_2x4_width_r1_left_neighbour():
    # Now A-line 2 is more similar to its left neighbour (column 1) and merges into it.
    metric = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]).expand(2, 4, 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0], [10.0, 20.0, 30.0, 50.0]])[..., None]
    x, size, _, owner = oim_merge_lines(*_state(x), metric, "width", r=1)
    assert torch.equal(x[..., 0], torch.tensor([[1.0, 2.5, 5.0], [10.0, 25.0, 50.0]]))
    assert torch.equal(size[0], torch.tensor([1.0, 2.0, 1.0]))
    assert owner.tolist() == [0, 1, 1, 2, 3, 4, 4, 5]


def test_hand_worked_height_r1():
    # The same example transposed: rows 2 and 3 merge.
    metric = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])[:, None, :].expand(4, 2, 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0], [10.0, 20.0, 30.0, 50.0]]).T[..., None]
    x, _, pos, owner = oim_merge_lines(*_state(x), metric, "height", r=1)
    assert torch.equal(x[..., 0], torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]]))
    assert torch.equal(pos[2], torch.tensor([[2.5, 0.0], [2.5, 1.0]]))
    assert owner.tolist() == [0, 1, 2, 3, 4, 5, 4, 5]
    assert x.is_contiguous()


def test_two_a_lines_into_one_b_line_weighted():
    # 1x3, r=2: both A-lines (0 and 2) merge into B-line 1; sizes (1, 2, 1) weight the mean.
    x = torch.tensor([[[1.0], [4.0], [10.0]]])
    size = torch.tensor([[1.0, 2.0, 1.0]])
    pos = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]]])
    owner = torch.tensor([0, 1, 1, 2])
    x, size, pos, owner = oim_merge_lines(x, size, pos, owner, None, "width", r=2)
    assert torch.equal(x, torch.tensor([[[19.0 / 4.0]]]))
    assert torch.equal(size, torch.tensor([[4.0]]))
    assert torch.equal(pos, torch.tensor([[[0.0, 1.0]]]))
    assert owner.tolist() == [0, 0, 0, 0]


def test_neighbour_tie_goes_right_and_match_tie_goes_to_lower_index():
    # A-line 0 has sim 0; A-line 2 has sim 1 on both sides: it takes the right neighbour (3).
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    x = torch.tensor([[[1.0], [2.0], [3.0], [5.0]]])
    out = oim_merge_lines(*_state(x), metric, "width", r=1)
    assert out[3].tolist() == [0, 1, 2, 2]
    # All similarities equal: A-lines 0 and 2 tie, the lower index (0 -> 1) wins.
    flat = torch.ones(1, 4, 2)
    out = oim_merge_lines(*_state(x), flat, "width", r=1)
    assert out[3].tolist() == [0, 0, 1, 2]
    assert torch.equal(out[0][0, :, 0], torch.tensor([1.5, 3.0, 5.0]))


def test_multiple_two_merges_super_lines_line_by_line():
    # 1x4, multiple=2: super-lines {0,1} and {2,3}; column 0 merges into 2 and column 1 into 3.
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    x, size, pos, owner = oim_merge_lines(*_state(x), None, "width", r=2, multiple=2)
    assert torch.equal(x[0, :, 0], torch.tensor([2.0, 3.0]))
    assert torch.equal(size, torch.tensor([[2.0, 2.0]]))
    assert torch.equal(pos[0], torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
    assert owner.tolist() == [0, 1, 0, 1]


def test_multiple_two_similarity_pairs_lines_offset_by_offset():
    # 1x6, multiple=2. Super-lines S0={0,1}, S1={2,3}, S2={4,5}. Column k of S0 matches column k of S1
    # exactly; S2 is orthogonal to S1, so S0 merges into S1 offset by offset.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0]]])
    x = torch.arange(6.0).view(1, 6, 1)
    x, _, _, owner = oim_merge_lines(*_state(x), metric, "width", r=2, multiple=2)
    assert owner.tolist() == [0, 1, 0, 1, 2, 3]
    assert torch.equal(x[0, :, 0], torch.tensor([1.0, 2.0, 4.0, 5.0]))


def test_pairs_mode_rows_choose_independently():
    # Row 0: token 2 is closest to 3; row 1: token 0 is closest to 1. r=1 per row keeps 2x3.
    metric = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]],
            [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],
        ]
    )
    x = torch.tensor([[1.0, 2.0, 3.0, 5.0], [10.0, 20.0, 30.0, 50.0]])[..., None]
    x, size, _, owner = oim_merge_pairs(*_state(x), metric, "width", r=1)
    assert x.shape == (2, 3, 1)
    assert torch.equal(x[..., 0], torch.tensor([[1.0, 2.0, 4.0], [15.0, 30.0, 50.0]]))
    assert torch.equal(size, torch.tensor([[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]]))
    assert owner.tolist() == [0, 1, 2, 2, 3, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------------
# exactness on structured inputs


@pytest.mark.parametrize("axis", ["width", "height"])
def test_pairwise_identical_lines_merge_exactly(axis):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 3, 4, generator=g)  # 3 distinct lines
    # Lines 2k and 2k+1 are identical: every A-line's best partner is its twin (cosine exactly 1).
    x = base.repeat_interleave(2, dim=1)
    if axis == "height":
        x = x.transpose(0, 1).contiguous()
    out_x, size, _, owner = oim_merge_lines(*_state(x), None, axis, r=3)
    expected = base if axis == "width" else base.transpose(0, 1)
    assert torch.equal(out_x, expected)
    assert bool((size == 2).all())
    _assert_partition(owner, size, 30)


@pytest.mark.parametrize("mode", ["lines", "pairs"])
@pytest.mark.parametrize("multiple", [1, 2])
def test_uniform_image_is_unchanged(mode, multiple):
    v = torch.tensor([0.3, -1.7, 2.5])
    x = v.expand(8, 12, 3).clone()
    state = _state(x)
    fn = oim_merge_lines if mode == "lines" else oim_merge_pairs
    for it, axis in enumerate(["width", "height", "width", "height"]):
        side = state[0].shape[1] if axis == "width" else state[0].shape[0]
        state = fn(*state, None, axis, rate_to_r(side, 0.4, multiple), multiple)
        torch.testing.assert_close(state[0], v.expand_as(state[0]), rtol=0, atol=1e-6)
    assert state[0].shape[0] < 8 and state[0].shape[1] < 12
    _assert_partition(state[3], state[1], 96)


def test_multiple_two_keeps_sides_even_through_alternating_iterations():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 16, 8, generator=g)
    state = _state(x)
    shapes = []
    for axis in ["width", "height"] * 3:
        side = state[0].shape[1] if axis == "width" else state[0].shape[0]
        state = oim_merge_lines(*state, state[0] * 2.0, axis, rate_to_r(side, 0.25, 2), multiple=2)
        shapes.append(tuple(state[0].shape[:2]))
        assert state[0].shape[0] % 2 == 0 and state[0].shape[1] % 2 == 0
    assert shapes == [(12, 12), (10, 12), (10, 10), (8, 10), (8, 8), (6, 8)]
    _assert_partition(state[3], state[1], 12 * 16)
    expected = _expected_from_owner(x.view(-1, 8), state[3], *state[0].shape[:2])
    torch.testing.assert_close(state[0].to(torch.float64), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# comparison with the naive loop implementation


@pytest.mark.parametrize(
    ("h", "w", "axis", "r", "multiple", "mode"),
    [
        (3, 7, "width", 3, 1, "lines"),
        (5, 4, "height", 2, 1, "lines"),
        (4, 12, "width", 4, 2, "lines"),
        (8, 6, "height", 4, 2, "lines"),
        (2, 10, "width", 100, 2, "lines"),
        (3, 9, "width", 4, 1, "pairs"),
        (7, 3, "height", 2, 1, "pairs"),
        (4, 8, "width", 4, 2, "pairs"),
        (6, 4, "height", 2, 2, "pairs"),
        (1, 5, "width", 100, 1, "pairs"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(h, w, axis, r, multiple, mode, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, w, 3, generator=g, dtype=torch.float64)
    metric = torch.randn(h, w, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (h, w), generator=g).to(torch.float64)
    pos = torch.rand(h, w, 2, generator=g, dtype=torch.float64) * 10
    owner = torch.randperm(h * w, generator=g)
    (gx, gs, gp, go), (ex, es, ep, eo) = _run_both(x, size, pos, owner, metric, axis, r, multiple, mode)
    torch.testing.assert_close(gx, torch.tensor(ex, dtype=torch.float64))
    torch.testing.assert_close(gs, torch.tensor(es, dtype=torch.float64))
    torch.testing.assert_close(gp, torch.tensor(ep, dtype=torch.float64))
    assert go.tolist() == eo


# ---------------------------------------------------------------------------------------------------------
# clamping, validation, rate_to_r


@pytest.mark.parametrize(
    ("w", "r", "multiple", "expected_w"),
    [(8, 8, 1, 4), (7, 100, 1, 3), (2, 2, 1, 1), (1, 1, 1, 1), (2, 2, 2, 2), (6, 6, 2, 2), (3, 2, 1, 1)],
)
def test_r_is_clamped_and_never_empties_the_axis(w, r, multiple, expected_w):
    x = torch.randn(2, w, 3)
    out = oim_merge_lines(*_state(x), None, "width", r, multiple)
    assert out[0].shape == (2, expected_w, 3)
    _assert_partition(out[3], out[1], 2 * w)


def test_zero_r_returns_inputs():
    state = _state(torch.randn(3, 4, 2))
    out = oim_merge_lines(*state, None, "height", 0)
    assert all(a is b for a, b in zip(out, state))


def test_validation_errors():
    state = _state(torch.randn(4, 6, 2))
    with pytest.raises(ValueError, match="multiple of multiple=2"):
        oim_merge_lines(*state, None, "width", 3, multiple=2)
    with pytest.raises(ValueError, match="divisible by multiple=4"):
        oim_merge_lines(*state, None, "width", 4, multiple=4)
    with pytest.raises(ValueError, match=">= 0"):
        oim_merge_lines(*state, None, "width", -1)
    with pytest.raises(ValueError, match="axis"):
        oim_merge_lines(*state, None, "depth", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric"):
        oim_merge_pairs(*state, torch.randn(4, 5, 2), "width", 1)
    with pytest.raises(ValueError, match="multiple of multiple=2"):
        oim_merge_pairs(*state, None, "height", 1, multiple=2)


@pytest.mark.parametrize(
    ("side", "rate", "multiple", "expected"),
    [
        (24, 0.25, 1, 6),
        (24, 0.25, 2, 6),
        (26, 0.25, 2, 6),  # 6.5 lines -> 6
        (10, 0.25, 2, 2),  # 2.5 -> 2
        (100, 0.29, 1, 29),  # 28.999999999999996 in binary
        (8, 1.0, 1, 7),  # at least one line remains
        (5, 0.5, 2, 2),
        (2, 1.0, 2, 0),  # never below `multiple` lines
        (3, 0.0, 1, 0),
    ],
)
def test_rate_to_r(side, rate, multiple, expected):
    assert rate_to_r(side, rate, multiple) == expected


def test_rate_to_r_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate"):
        rate_to_r(10, 1.5, 1)


# ---------------------------------------------------------------------------------------------------------
# property tests

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(
    multiple=st.sampled_from([1, 2]),
    units_h=st.integers(1, 12),
    units_w=st.integers(1, 12),
    c=st.integers(1, 6),
    dtype=st.sampled_from(_DTYPES),
    mode=st.sampled_from(["lines", "pairs"]),
    first_axis=st.sampled_from(["width", "height"]),
    rates=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
    use_metric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_invariants(multiple, units_h, units_w, c, dtype, mode, first_axis, rates, use_metric, seed):
    # Sides in 1..12, divisible by `multiple`.
    h = max(multiple, units_h // multiple * multiple)
    w = max(multiple, units_w // multiple * multiple)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(h, w, c, generator=g).to(dtype)
    state = _state(x0)
    fn = oim_merge_lines if mode == "lines" else oim_merge_pairs
    axes = ["width", "height"] if first_axis == "width" else ["height", "width"]
    for i, rate in enumerate(rates):
        axis = axes[i % 2]
        hh, ww = state[0].shape[:2]
        side = ww if axis == "width" else hh
        metric = torch.randn(hh, ww, 3, generator=g).to(dtype) if use_metric else None
        state = fn(*state, metric, axis, rate_to_r(side, rate, multiple), multiple)
        xs, size, pos, owner = state
        hh, ww = xs.shape[:2]
        assert xs.dtype == dtype and xs.shape[2] == c
        assert hh % multiple == 0 and ww % multiple == 0 and hh >= 1 and ww >= 1
        assert not torch.isnan(xs).any()
        assert bool((size > 0).all())
        assert float(size.sum()) == h * w
        _assert_partition(owner, size, h * w)

    xs, size, pos, owner = state
    hh, ww = xs.shape[:2]
    _, pos0, _ = init_grid_state(h, w)
    exp_pos = _expected_from_owner(pos0.view(-1, 2), owner, hh, ww)
    torch.testing.assert_close(pos.to(torch.float64), exp_pos, rtol=1e-5, atol=1e-5)
    exp_x = _expected_from_owner(x0.view(-1, c), owner, hh, ww)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(xs.to(torch.float64), exp_x, rtol=tol, atol=tol)
