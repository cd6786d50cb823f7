"""Tests of the ToMe tensor functions (strategies/tome.py).

Oracles: hand-built metrics whose matching can be read off, hand-computed schedules, and a naive
pure-Python loop implementation of one matching step (``_naive_step``) written from the specification.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokcomp.strategies.tome import (
    bipartite_soft_matching,
    merge_source,
    merge_wavg,
    parse_r,
    proportional_attention_bias,
)

# ---------------------------------------------------------------------------------------------------------
# naive reference


def _cos(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v)) / (
        math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v))
    )


def _naive_step(metric: list[list[float]], r: int, class_token: bool, distill_token: bool) -> list[list[int]]:
    """One ToMe step on one sample: the current indices that form each output token, in output order."""
    t = len(metric)
    r = min(r, (t - int(class_token) - int(distill_token)) // 2)
    if r <= 0:
        return [[i] for i in range(t)]
    a_tokens = list(range(0, t, 2))
    b_tokens = list(range(1, t, 2))
    best = []  # (similarity, index into B) per A token
    for ai, a in enumerate(a_tokens):
        if class_token and ai == 0:
            best.append((-math.inf, 0))
            continue
        cands = [
            (-math.inf if distill_token and bi == 0 else _cos(metric[a], metric[b]), bi)
            for bi, b in enumerate(b_tokens)
        ]
        best.append(max(cands, key=lambda c: c[0]))
    order = sorted(range(len(a_tokens)), key=lambda ai: -best[ai][0])
    src, unm = order[:r], order[r:]
    if class_token:
        unm = sorted(unm)
    unm_groups = [[a_tokens[ai]] for ai in unm]
    dst_groups = [[b] + [a_tokens[ai] for ai in src if best[ai][1] == bi] for bi, b in enumerate(b_tokens)]
    if distill_token:
        return unm_groups[:1] + dst_groups[:1] + unm_groups[1:] + dst_groups[1:]
    return unm_groups + dst_groups


def _metric_4d() -> torch.Tensor:
    """Six tokens; best B partner of A0 is B1 (cos 0.5), of A2 is B3 (cos 0.9), of A4 is B5 (cos 1)."""
    e = torch.eye(4)
    a0 = 0.5 * e[0] + math.sqrt(0.75) * e[3]
    a2 = 0.9 * e[1] + math.sqrt(1 - 0.81) * e[3]
    a4 = e[2]
    return torch.stack([a0, e[0], a2, e[1], a4, e[2]])[None]


# ---------------------------------------------------------------------------------------------------------
# order after a merge


def test_order_unmerged_descending_similarity_then_all_b():
    x = torch.arange(6.0).view(1, 6, 1) * 10
    merge, _ = bipartite_soft_matching(_metric_4d(), r=1)
    # A4 -> B5 merges; unmerged A tokens by descending similarity: A2 (0.9) before A0 (0.5).
    assert merge(x)[0, :, 0].tolist() == [20.0, 0.0, 10.0, 30.0, 45.0]
    merge, _ = bipartite_soft_matching(_metric_4d(), r=2)
    assert merge(x)[0, :, 0].tolist() == [0.0, 10.0, 25.0, 45.0]


def test_class_token_is_protected_and_first():
    x = torch.arange(6.0).view(1, 6, 1) * 10
    # A0 would be the best source if it were not the class token.
    metric = _metric_4d()
    metric[0, 0] = metric[0, 1]
    merge, _ = bipartite_soft_matching(metric, r=2, class_token=True)
    out = merge(x)[0, :, 0].tolist()
    # Unmerged A tokens in ascending index order: the class token first.
    assert out == [0.0, 10.0, 25.0, 45.0]
    merge, _ = bipartite_soft_matching(metric, r=1, class_token=True)
    assert merge(x)[0, :, 0].tolist() == [0.0, 20.0, 10.0, 30.0, 45.0]


def test_distill_token_receives_nothing_and_stays_second():
    e = torch.eye(4)
    a2 = torch.tensor([0.9, 0.1, 0.3, 0.0])  # closest to B1 (the distill token), then to B5
    a4 = torch.tensor([0.0, 0.2, 0.0, 1.0])  # weakly closest to B3
    metric = torch.stack([e[3], e[0], a2, e[1], a4, e[2]])[None]
    x = torch.arange(6.0).view(1, 6, 1) * 10
    merge, unmerge = bipartite_soft_matching(metric, r=1, class_token=True, distill_token=True)
    out = merge(x)
    # [unm[0], dst[0], unm[1:], dst[1:]] with unm = [cls, A4] and A2 merged into B5.
    assert out[0, :, 0].tolist() == [0.0, 10.0, 40.0, 30.0, 35.0]
    assert unmerge(out)[0, :, 0].tolist() == [0.0, 10.0, 35.0, 30.0, 40.0, 35.0]


@pytest.mark.parametrize(
    ("class_token", "distill_token"), [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize(("t", "r"), [(9, 3), (16, 7), (11, 100)])
def test_order_matches_naive_loop(class_token, distill_token, t, r):
    g = torch.Generator().manual_seed(t * 31 + r)
    metric = torch.randn(2, t, 5, generator=g, dtype=torch.float64)
    x = torch.randn(2, t, 3, generator=g, dtype=torch.float64)
    merge, _ = bipartite_soft_matching(metric, r, class_token, distill_token)
    out = merge(x, mode="mean")
    for b in range(2):
        groups = _naive_step(metric[b].tolist(), r, class_token, distill_token)
        expected = torch.stack([x[b, grp].mean(dim=0) for grp in groups])
        torch.testing.assert_close(out[b], expected)
        if class_token:
            assert torch.equal(out[b, 0], x[b, 0])
        if distill_token:
            assert torch.equal(out[b, 1], x[b, 1])


# ---------------------------------------------------------------------------------------------------------
# sizes, source, unmerge


def test_merge_wavg_two_rounds_matches_naive_groups():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 14, 6, generator=g, dtype=torch.float64)
    x, size, source = x0, None, None
    groups = [[[i] for i in range(14)] for _ in range(2)]  # original patches of each current token
    for r, class_token in [(4, True), (3, True)]:
        merge, _ = bipartite_soft_matching(x, r, class_token=class_token)
        source = merge_source(merge, x, source)
        steps = [_naive_step(x[b].tolist(), r, class_token, False) for b in range(2)]
        x, size = merge_wavg(merge, x, size)
        groups = [[[p for i in grp for p in groups[b][i]] for grp in steps[b]] for b in range(2)]
    assert x.shape == (2, 7, 6) and size.shape == (2, 7, 1)
    for b in range(2):
        expected_x = torch.stack([x0[b, grp].mean(dim=0) for grp in groups[b]])
        torch.testing.assert_close(x[b], expected_x)
        assert size[b, :, 0].tolist() == [float(len(grp)) for grp in groups[b]]
        expected_source = torch.zeros(7, 14, dtype=torch.float64)
        for i, grp in enumerate(groups[b]):
            expected_source[i, grp] = 1.0
        assert torch.equal(source[b], expected_source)


def test_merge_source_rows_partition_the_originals():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 20, 4, generator=g)
    size, source = None, None
    for r in [5, 4, 3]:
        merge, _ = bipartite_soft_matching(x, r, class_token=True)
        source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
    assert source.shape == (3, 8, 20)
    assert bool(((source == 0) | (source == 1)).all())
    assert bool((source.sum(dim=1) == 1).all()), "an original patch is covered zero or several times"
    assert bool((source.sum(dim=2) >= 1).all())
    assert torch.equal(source.sum(dim=2), size[..., 0])
    assert bool((source[:, 0, 0] == 1).all()) and bool((source[:, 0].sum(dim=1) == 1).all())


@pytest.mark.parametrize(("class_token", "distill_token"), [(False, False), (True, False), (True, True)])
def test_unmerge_restores_layout(class_token, distill_token):
    g = torch.Generator().manual_seed(11)
    metric = torch.randn(2, 12, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 12, 3, generator=g, dtype=torch.float64)
    merge, unmerge = bipartite_soft_matching(metric, 4, class_token, distill_token)
    merged = merge(x)
    back = unmerge(merged)
    assert back.shape == x.shape
    for b in range(2):
        groups = _naive_step(metric[b].tolist(), 4, class_token, distill_token)
        for out_i, grp in enumerate(groups):
            for orig in grp:
                assert torch.equal(back[b, orig], merged[b, out_i])


# ---------------------------------------------------------------------------------------------------------
# clamping and schedules


@pytest.mark.parametrize(
    ("t", "r", "class_token", "distill_token", "expected_t"),
    [(7, 10, True, False, 4), (8, 100, False, False, 4), (9, 100, True, True, 6), (2, 1, True, True, 2)],
)
def test_r_clamped_to_half_of_unprotected(t, r, class_token, distill_token, expected_t):
    x = torch.randn(1, t, 3)
    merge, unmerge = bipartite_soft_matching(x, r, class_token, distill_token)
    assert merge(x).shape == (1, expected_t, 3)
    assert unmerge(merge(x)).shape == (1, t, 3)


def test_nonpositive_r_is_identity():
    x = torch.randn(1, 6, 3)
    merge, unmerge = bipartite_soft_matching(x, 0)
    assert merge(x) is x and unmerge(x) is x


def test_parse_r_int_and_list():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    assert parse_r(5, [5, 3]) == [5, 3, 0, 0, 0]
    assert parse_r(2, [1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="shorten"):
        parse_r(2, [1, 2, 3])


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        ((4, -1), [8, 5, 2, 0]),  # lo 8, hi 0, step -8/3: 8, 5.33, 2.67, 0
        ((4, 0), [4, 4, 4, 4]),
        ((4, 1), [0, 2, 5, 8]),  # lo 0, hi 8: 0, 2.67, 5.33, 8
        ((3, 0.5), [1, 2, 3, 5]),  # lo int(1.5) = 1, hi 5, step 4/3
    ],
)
def test_parse_r_inflect(r, expected):
    assert parse_r(4, r) == expected


def test_parse_r_edge_cases():
    assert parse_r(1, (4, -1)) == [8]
    assert parse_r(0, 5) == []
    with pytest.raises(ValueError, match="inflect"):
        parse_r(4, (4, 2.0))
    with pytest.raises(TypeError):
        parse_r(4, 2.5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# proportional attention


def test_proportional_attention_bias_equals_duplicated_keys():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 8, generator=g)
    k = torch.randn(1, 2, 3, 8, generator=g)
    v = torch.randn(1, 2, 3, 8, generator=g)
    size = torch.tensor([[[2.0], [1.0], [3.0]]])
    bias = proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.log(size[0, :, 0]))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    # A token of size s attends like s identical copies of itself.
    reps = torch.tensor([2, 1, 3])
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(reps, dim=2), v.repeat_interleave(reps, dim=2)
    )
    torch.testing.assert_close(out, ref)
    assert proportional_attention_bias(size[..., 0], dtype=torch.bfloat16).dtype == torch.bfloat16
