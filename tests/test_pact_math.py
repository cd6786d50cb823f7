"""Tests of PACT's pure tensor functions (EUTI, DBDPC, retrieval, merge).

The oracles are independent of the code under test: hand-worked numbers, or plain Python loops in float64
that follow the specification (docs: baselines.md §3) step by step.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokcomp.strategies.pact import (
    cosine_distances,
    dbdpc,
    euti_keep_count,
    euti_scores,
    euti_select,
    merge_clusters,
    non_text_mask,
    retrieve_pruned,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------------
# Independent float64 oracles (plain loops).


def _rows64(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def _cos_dist64(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(v * v for v in a))
    nb = math.sqrt(sum(v * v for v in b))
    if na == 0.0 or nb == 0.0:
        return 1.0
    return max(0.0, 1.0 - sum(u * v for u, v in zip(a, b)) / (na * nb))


def _dist_matrix64(rows: list[list[float]]) -> list[list[float]]:
    n = len(rows)
    return [[0.0 if i == j else _cos_dist64(rows[i], rows[j]) for j in range(n)] for i in range(n)]


def _density64(dist: list[list[float]], dc: float = 2.0) -> list[float]:
    return [sum(math.exp(-((d / dc) ** 2)) for d in row) for row in dist]


def _dbdpc_loop(dist: list[list[float]], cutoff: float) -> tuple[list[int], list[int]]:
    """Greedy DBDPC exactly as worded in the spec, point by point."""
    rho = _density64(dist)
    n = len(dist)
    visit = sorted(range(n), key=lambda i: (-rho[i], i))
    centres: list[int] = []
    for p in visit:
        if all(dist[p][c] > cutoff for c in centres):
            centres.append(p)
    centres.sort()
    labels = [min(centres, key=lambda c: (dist[i][c], c)) for i in range(n)]
    return centres, labels


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


# --------------------------------------------------------------------------------------------------------
# DBDPC: hand-worked example.


def _angles(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])


def test_dbdpc_hand_worked_example() -> None:
    # Unit vectors in 2-D, so D_ij = 1 - cos(angle_i - angle_j):
    #   idx:    0      1      2      3
    #   angle: 25°   -90°    45°     0°
    #   D(0,1) = 1 - cos115° = 1.4226   D(0,2) = 1 - cos20° = 0.0603   D(0,3) = 1 - cos25° = 0.0937
    #   D(1,2) = 1 - cos135° = 1.7071   D(1,3) = 1 - cos90° = 1.0000   D(2,3) = 1 - cos45° = 0.2929
    # Density with dc = 2, f(D) = exp(-(D/2)^2) (self term f(0) = 1):
    #   rho0 = 1 + f(1.4226) + f(0.0603) + f(0.0937) = 1 + 0.6029 + 0.9991 + 0.9978 = 3.5998
    #   rho1 = 1 + 0.6029 + f(1.7071) + f(1.0)       = 1 + 0.6029 + 0.4826 + 0.7788 = 2.8643
    #   rho2 = 1 + 0.9991 + 0.4826 + f(0.2929)       = 1 + 0.9991 + 0.4826 + 0.9788 = 3.4605
    #   rho3 = 1 + 0.9978 + 0.7788 + 0.9788                                          = 3.7554
    # Visiting order (decreasing rho): 3, 0, 2, 1. With cutoff 0.15:
    #   3 -> centre; 0: D(0,3) = 0.094 <= 0.15, covered; 2: D(2,3) = 0.293 > 0.15 -> centre;
    #   1: D(1,3) = 1.0 and D(1,2) = 1.707 -> centre.       centres = [1, 2, 3]
    # Assignment to the NEAREST centre: point 0 was covered by 3 (0.094) but is nearer to 2 (0.060) -> 2.
    x = _angles(25, -90, 45, 0)
    centres, labels = dbdpc(x, cutoff=0.15)
    assert centres.tolist() == [1, 2, 3]
    assert labels.tolist() == [2, 1, 2, 3]
    assert centres.dtype == torch.long and labels.dtype == torch.long

    # Retrieval radius alpha * cutoff = 0.225. Nearest centre of each pruned point:
    #   60°:  centre 2 (45°),  D = 1 - cos15° = 0.0341 <= 0.225 -> 2
    #   -35°: centre 3 (0°),   D = 1 - cos35° = 0.1808 (> cutoff but <= 0.225) -> 3
    #   -42°: centre 3 (0°),   D = 1 - cos42° = 0.2569 > 0.225 (centre 1 at -90°: 1 - cos48° = 0.331) -> -1
    #   150°: centre 2 (45°),  D = 1 - cos105° = 1.2588 -> -1
    pruned = _angles(60, -35, -42, 150)
    got = retrieve_pruned(pruned, x[centres], centres, cutoff=0.15)
    assert got.tolist() == [2, 3, -1, -1]
    # alpha = 1 shrinks the radius to 0.15: the -35° point is no longer retrieved.
    assert retrieve_pruned(pruned, x[centres], centres, cutoff=0.15, alpha=1.0).tolist() == [2, -1, -1, -1]

    # Merge: cluster 1 = {1}; cluster 2 = {0, 2, pruned 60°}; cluster 3 = {3, pruned -35°}.
    hidden = torch.tensor([[1.0, 2.0], [10.0, 20.0], [3.0, 4.0], [5.0, 6.0]])
    pruned_hidden = torch.tensor([[8.0, 0.0], [7.0, 2.0], [100.0, 100.0], [-100.0, 0.0]])
    merged, sizes = merge_clusters(hidden, labels, centres, pruned_hidden, got)
    expected = [[10.0, 20.0], [(1 + 3 + 8) / 3, (2 + 4 + 0) / 3], [(5 + 7) / 2, (6 + 2) / 2]]
    torch.testing.assert_close(merged, torch.tensor(expected))
    assert sizes.tolist() == [1.0, 3.0, 2.0]
    assert sizes.dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# DBDPC on clusterable synthetic data.


def test_dbdpc_finds_one_centre_per_group_and_retrieves() -> None:
    gen = torch.Generator().manual_seed(1234)
    c, cutoff = 16, 0.1
    group_sizes = [5, 4, 6, 3]
    directions = [_unit(torch.randn(c, generator=gen)) for _ in group_sizes]
    group = torch.cat([torch.full((s,), g) for g, s in enumerate(group_sizes)])
    group = group[torch.randperm(len(group), generator=gen)]  # interleave the groups
    x = torch.stack([directions[g] + 0.03 * torch.randn(c, generator=gen) for g in group.tolist()])
    n = x.shape[0]

    dist = _dist_matrix64(_rows64(x))
    same = [[group[i] == group[j] for j in range(n)] for i in range(n)]
    # The fixture must really be clusterable at this cutoff.
    assert max(dist[i][j] for i in range(n) for j in range(n) if same[i][j]) < 0.05
    assert min(dist[i][j] for i in range(n) for j in range(n) if not same[i][j]) > 0.5

    # The densest point of each group is visited first in it, covers its whole group and nothing else,
    # so it is that group's only centre.
    rho = _density64(dist)
    expected_centre = {}
    for g in range(len(group_sizes)):
        members = sorted((i for i in range(n) if group[i] == g), key=lambda i: (-rho[i], i))
        assert rho[members[0]] - rho[members[1]] > 1e-4, "fixture too close to a density tie"
        expected_centre[g] = members[0]

    centres, labels = dbdpc(x, cutoff)
    assert centres.tolist() == sorted(expected_centre.values())
    assert labels.tolist() == [expected_centre[g] for g in group.tolist()]

    # Pruned points built at a known distance from a centre, along a direction orthogonal to every centre,
    # so that the other centres stay far away.
    centre_dirs = torch.stack([_unit(x[expected_centre[g]]) for g in range(len(group_sizes))])
    basis = torch.linalg.qr(centre_dirs.T).Q  # (c, 4), spans the centres
    ortho = torch.randn(c, generator=gen)
    ortho = _unit(ortho - basis @ (basis.T @ ortho))

    def at_distance(g: int, d: float) -> torch.Tensor:
        cos = 1.0 - d
        return cos * centre_dirs[g] + math.sqrt(1.0 - cos * cos) * ortho

    pruned = torch.stack([at_distance(0, 0.12), at_distance(1, 0.2), at_distance(2, 0.01), ortho])
    retrieved = retrieve_pruned(pruned, x[centres], centres, cutoff, alpha=1.5)
    # 0.12 <= 1.5 * 0.1 is retrieved; 0.2 > 0.15 is not; the orthogonal point is at distance 1 from all.
    assert retrieved.tolist() == [expected_centre[0], -1, expected_centre[2], -1]

    hidden = torch.randn(n, 8, generator=gen)
    pruned_hidden = torch.randn(4, 8, generator=gen)
    merged, sizes = merge_clusters(hidden, labels, centres, pruned_hidden, retrieved)
    extra = {0: [0], 2: [2]}  # retrieved pruned rows per group
    by_centre = {v: g for g, v in expected_centre.items()}
    for row, centre in enumerate(centres.tolist()):
        g = by_centre[centre]
        members = [hidden[i].double() for i in range(n) if group[i] == g]
        members += [pruned_hidden[j].double() for j in extra.get(g, [])]
        torch.testing.assert_close(merged[row].double(), sum(members) / len(members))
        assert sizes[row].item() == group_sizes[g] + len(extra.get(g, []))
    assert sizes.sum().item() == n + 2


# --------------------------------------------------------------------------------------------------------
# cutoff = 0: the identity.


@pytest.mark.parametrize("dtype", DTYPES)
def test_cutoff_zero_distinct_points_is_identity(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(30, 6, generator=gen).to(dtype)
    hidden = torch.randn(30, 5, generator=gen).to(dtype)
    centres, labels = dbdpc(x, cutoff=0.0)
    assert centres.tolist() == list(range(30))
    assert labels.tolist() == list(range(30))
    merged, sizes = merge_clusters(hidden, labels, centres)
    assert merged.dtype == dtype
    assert torch.equal(merged, hidden)
    assert torch.equal(sizes, torch.ones(30))
    # Nothing distinct is within 1.5 * 0 of a centre.
    pruned = torch.randn(5, 6, generator=gen).to(dtype)
    assert retrieve_pruned(pruned, x[centres], centres, cutoff=0.0).tolist() == [-1] * 5


def test_cutoff_zero_merges_exact_duplicates() -> None:
    # Distance 0 is not > 0, so an exact duplicate never becomes a second centre, and a pruned exact copy of
    # a centre is retrieved even with a zero radius. These vectors are chosen because a plain float32
    # 1 - x̂·x̂ leaves a positive residue for them (6e-8 and 1.2e-7 on x86 CPUs), which must not count.
    a = torch.tensor([1.4875, -0.2230, -1.0057, -0.4139])
    b = torch.tensor([-0.0052, -0.0944, -1.1236, -0.6513])
    x = torch.stack([a, b, a, b, a])
    centres, labels = dbdpc(x, cutoff=0.0)
    assert centres.tolist() == [0, 1]
    assert labels.tolist() == [0, 1, 0, 1, 0]
    assert retrieve_pruned(torch.stack([b, a + 1, a]), x[centres], centres, 0.0).tolist() == [1, -1, 0]
    d = cosine_distances(x)
    assert d[0, 2] == 0 and d[1, 3] == 0 and torch.equal(d, d.T)
    cross = cosine_distances(torch.stack([b, a]), x[:2])  # rows b, a against columns a, b
    assert cross[0, 1] == 0 and cross[1, 0] == 0 and cross[0, 0] > 0.4


def test_cosine_distances_clamped_symmetric_zero_diagonal() -> None:
    # Positive multiples of one vector: mathematically all at distance 0, but 1 - x̂·x̂ rounds to about ±1e-7,
    # and a negative distance must be clamped to 0.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, generator=gen) * (0.1 + 10 * torch.rand(50, 1, generator=gen))
    d = cosine_distances(x)
    assert d.shape == (50, 50) and d.dtype == torch.float32
    assert d.min() >= 0 and d.max() < 1e-5
    assert torch.equal(d, d.T) and torch.equal(d.diagonal(), torch.zeros(50))
    cross = cosine_distances(x[:20], x[20:])
    assert cross.shape == (20, 30) and cross.min() >= 0 and cross.max() < 1e-5


# --------------------------------------------------------------------------------------------------------
# DBDPC property tests.


@st.composite
def _cluster_inputs(draw: st.DrawFn) -> dict:
    n = draw(st.integers(0, 40))
    c = draw(st.integers(1, 16))
    dtype = draw(st.sampled_from(DTYPES))
    cutoff = draw(st.one_of(st.sampled_from([0.0, 0.1, 0.21, 1.0]), st.floats(0.0, 2.5)))
    seed = draw(st.integers(0, 2**31 - 1))
    pool_size = draw(st.integers(1, max(n, 1)))  # a small pool gives exact duplicate rows
    m = draw(st.integers(0, 10))
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_size, c, generator=gen)
    x = pool[torch.randint(pool_size, (n,), generator=gen)].to(dtype)
    pruned = torch.randn(m, c, generator=gen).to(dtype)
    hidden = torch.randn(n, 4, generator=gen).to(dtype)
    pruned_hidden = torch.randn(m, 4, generator=gen).to(dtype)
    return {"x": x, "cutoff": cutoff, "pruned": pruned, "hidden": hidden, "pruned_hidden": pruned_hidden}


TOL = 1e-5  # float32 distances against the float64 oracle


@FAST
@given(_cluster_inputs())
def test_dbdpc_properties(inp: dict) -> None:
    x, cutoff = inp["x"], inp["cutoff"]
    n = x.shape[0]
    centres, labels = dbdpc(x, cutoff)
    rows = _rows64(x)
    cl, lab = centres.tolist(), labels.tolist()

    assert labels.shape == (n,)
    assert cl == sorted(set(cl)) and (n == 0 or len(cl) >= 1)
    assert set(lab) <= set(cl)
    assert all(lab[c] == c for c in cl)
    for i in range(n):
        d_own = _cos_dist64(rows[i], rows[lab[i]])
        assert d_own <= cutoff + TOL
        assert d_own <= min(_cos_dist64(rows[i], rows[c]) for c in cl) + TOL  # nearest centre
    for a in cl:
        for b in cl:
            if a < b:
                assert _cos_dist64(rows[a], rows[b]) > cutoff - TOL

    retrieved = retrieve_pruned(inp["pruned"], x[centres], centres, cutoff)
    prow = _rows64(inp["pruned"])
    for j, r in enumerate(retrieved.tolist()):
        nearest = min((_cos_dist64(prow[j], rows[c]) for c in cl), default=math.inf)
        if r == -1:
            assert nearest > 1.5 * cutoff - TOL
        else:
            assert r in cl and _cos_dist64(prow[j], rows[r]) <= min(1.5 * cutoff, nearest) + TOL

    merged, sizes = merge_clusters(inp["hidden"], labels, centres, inp["pruned_hidden"], retrieved)
    assert merged.shape == (len(cl), 4) and merged.dtype == x.dtype
    assert not torch.isnan(merged).any()
    assert sizes.sum().item() == n + int((retrieved != -1).sum())
    assert (sizes >= 1).all()


@st.composite
def _distinct_clustered(draw: st.DrawFn) -> tuple[torch.Tensor, float]:
    """Distinct points around a few random directions, so that clusters of several points exist."""
    n = draw(st.integers(0, 40))
    c = draw(st.integers(2, 16))
    dtype = draw(st.sampled_from(DTYPES))
    cutoff = draw(st.one_of(st.sampled_from([0.0, 0.1, 0.21, 0.5]), st.floats(0.0, 1.5)))
    n_groups = draw(st.integers(1, 6))
    spread = draw(st.sampled_from([0.05, 0.2, 0.5]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dirs = torch.randn(n_groups, c, generator=gen)
    x = dirs[torch.randint(n_groups, (n,), generator=gen)] + spread * torch.randn(n, c, generator=gen)
    return x.to(dtype), cutoff


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
@given(_distinct_clustered())
def test_dbdpc_matches_greedy_loop_oracle(inp: tuple[torch.Tensor, float]) -> None:
    x, cutoff = inp
    rows = _rows64(x)
    n = len(rows)
    assume(len({tuple(r) for r in rows}) == n)  # duplicates have their own tests
    dist = _dist_matrix64(rows)
    rho = sorted(_density64(dist))
    # Skip inputs the float32 computation cannot resolve the same way as float64: near-equal densities, or
    # distances within rounding of the cutoff.
    assume(all(b - a > 2e-5 for a, b in itertools.pairwise(rho)))
    assume(all(abs(d - cutoff) > 1e-5 for row in dist for d in row))
    exp_centres, exp_labels = _dbdpc_loop(dist, cutoff)
    for i in range(n):
        ds = sorted(dist[i][c] for c in exp_centres)
        assume(len(ds) < 2 or ds[1] - ds[0] > 1e-5)
    centres, labels = dbdpc(x, cutoff)
    assert centres.tolist() == exp_centres
    assert labels.tolist() == exp_labels


@FAST
@given(
    n=st.integers(1, 40),
    c=st.integers(1, 16),
    dtype=st.sampled_from(DTYPES),
    cutoff=st.floats(0.0, 2.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_identical_tokens_collapse_to_one_cluster(
    n: int, c: int, dtype: torch.dtype, cutoff: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, generator=gen).to(dtype).expand(n, c)
    hidden = torch.randn(1, 3, generator=gen).to(dtype).expand(n, 3)
    centres, labels = dbdpc(x, cutoff)
    assert centres.tolist() == [0]  # equal densities: the lowest index is visited first
    assert labels.tolist() == [0] * n
    merged, sizes = merge_clusters(hidden, labels, centres)
    assert sizes.tolist() == [float(n)]
    torch.testing.assert_close(merged, hidden[:1])


def test_zero_tokens() -> None:
    for dtype in DTYPES:
        centres, labels = dbdpc(torch.zeros(0, 8, dtype=dtype), 0.1)
        assert centres.shape == (0,) and labels.shape == (0,)
        assert centres.dtype == torch.long and labels.dtype == torch.long
        got = retrieve_pruned(torch.randn(3, 8).to(dtype), torch.zeros(0, 8, dtype=dtype), centres, 0.1)
        assert got.tolist() == [-1, -1, -1]
        merged, sizes = merge_clusters(
            torch.zeros(0, 5, dtype=dtype), labels, centres, torch.randn(3, 5).to(dtype), got
        )
        assert merged.shape == (0, 5) and merged.dtype == dtype and sizes.shape == (0,)
    assert retrieve_pruned(torch.zeros(0, 4), torch.randn(2, 4), torch.tensor([0, 3]), 0.1).shape == (0,)


def test_single_token() -> None:
    centres, labels = dbdpc(torch.tensor([[0.5, -0.25]], dtype=torch.bfloat16), 0.2)
    assert centres.tolist() == [0] and labels.tolist() == [0]


# --------------------------------------------------------------------------------------------------------
# EUTI.


def test_non_text_mask() -> None:
    visual = torch.tensor([False, True, False, True, False, False])
    assert non_text_mask(visual).tolist() == [True, True, True, True, False, False]
    assert non_text_mask(torch.zeros(3, dtype=torch.bool)).tolist() == [False] * 3


def test_euti_keep_count_truncates_like_the_reference() -> None:
    assert euti_keep_count(100, 0.29) == 28  # 100 * 0.29 == 28.999999999999996
    assert euti_keep_count(10, 0.55) == 5
    assert euti_keep_count(7, 1.0) == 7
    assert euti_keep_count(0, 0.5) == 0


def test_euti_scores_hand_computed() -> None:
    # N = 4 positions: 0 = system prompt (non-text, not visual), 1 and 2 visual, 3 text (excluded).
    # d = 1, two query heads sharing one key head (GQA).
    # Head 0: q = 1, 2, 3 on the prefix -> mean 2; keys 0, ln2/2, ln4/2 -> logits 0, ln2, ln4
    #         -> softmax (1, 2, 4) / 7.
    # Head 1: q = 1, -2, 1 -> mean 0 -> uniform 1/3 each.
    # Head mean at positions 1, 2: (2/7 + 1/3)/2 = 13/42 and (4/7 + 1/3)/2 = 19/42.
    # ||h_1|| = ||(3, 4)|| = 5, ||h_2|| = ||(0, 2)|| = 2 -> scores 65/42 and 38/42.
    # The text position has a huge key and query: if it leaked into the mean or the softmax, this would break.
    q = torch.tensor([[[1.0], [2.0], [3.0], [50.0]], [[1.0], [-2.0], [1.0], [50.0]]])
    k = torch.tensor([[[0.0], [math.log(2) / 2], [math.log(4) / 2], [100.0]]])
    hidden = torch.tensor([[9.0, 9.0], [3.0, 4.0], [0.0, 2.0], [7.0, 7.0]])
    visual = torch.tensor([False, True, True, False])
    not_text = torch.tensor([True, True, True, False])
    got = euti_scores(q, k, hidden, not_text, visual)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([65 / 42, 38 / 42]))


def _euti_loop(q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor, not_text: list, visual: list) -> list:
    """EUTI with explicit loops in float64, keys repeated per query head by integer division."""
    n_heads, n, d = q.shape
    group = n_heads // k.shape[0]
    qd, kd, hd = q.double().tolist(), k.double().tolist(), hidden.double().tolist()
    prefix = [j for j in range(n) if not_text[j]]
    if not prefix:
        return []
    attn = [0.0] * n
    for h in range(n_heads):
        kh = kd[h // group]
        qbar = [sum(qd[h][j][t] for j in prefix) / len(prefix) for t in range(d)]
        logits = {j: sum(qbar[t] * kh[j][t] for t in range(d)) / math.sqrt(d) for j in prefix}
        top = max(logits.values())
        z = sum(math.exp(v - top) for v in logits.values())
        for j in prefix:
            attn[j] += math.exp(logits[j] - top) / z / n_heads
    return [attn[i] * math.sqrt(sum(v * v for v in hd[i])) for i in range(n) if visual[i]]


@FAST
@given(
    n_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    n=st.integers(1, 12),
    d=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_euti_scores_match_loop_oracle(
    n_kv: int, group: int, n: int, d: int, dtype: torch.dtype, seed: int, data: st.DataObject
) -> None:
    visual = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    not_text = non_text_mask(torch.tensor(visual, dtype=torch.bool)).tolist()
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_kv * group, n, d, generator=gen).to(dtype)
    k = torch.randn(n_kv, n, d, generator=gen).to(dtype)
    hidden = torch.randn(n, 5, generator=gen).to(dtype)
    got = euti_scores(q, k, hidden, torch.tensor(not_text), torch.tensor(visual, dtype=torch.bool))
    expected = torch.tensor(_euti_loop(q, k, hidden, not_text, visual), dtype=torch.float64)
    assert got.shape == (sum(visual),)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_euti_gqa_equals_explicitly_repeated_keys() -> None:
    gen = torch.Generator().manual_seed(3)
    n, d = 9, 4
    q = torch.randn(4, n, d, generator=gen)
    k = torch.randn(2, n, d, generator=gen)
    hidden = torch.randn(n, 6, generator=gen)
    visual = torch.tensor([False, False, True, True, True, False, True, True, False])
    not_text = non_text_mask(visual)
    gqa = euti_scores(q, k, hidden, not_text, visual)
    # KV head 0 serves query heads 0 and 1, KV head 1 serves 2 and 3.
    mha = euti_scores(q, k.repeat_interleave(2, dim=0), hidden, not_text, visual)
    torch.testing.assert_close(gqa, mha)
    # The other layout (KV head 0 serving query heads 0 and 2) gives different scores.
    assert not torch.allclose(gqa, euti_scores(q, k.repeat(2, 1, 1), hidden, not_text, visual))


def test_euti_nan_becomes_zero() -> None:
    # An infinite query gives logits (inf, -inf, ...) in head 0; its softmax is NaN, so every head average is
    # NaN, which the spec replaces by 0.
    q = torch.ones(2, 3, 1)
    q[0, 0, 0] = math.inf
    k = torch.tensor([[[1.0], [-1.0], [1.0]]])
    visual = torch.tensor([False, True, True])
    got = euti_scores(q, k, torch.ones(3, 2), non_text_mask(visual), visual)
    assert torch.equal(got, torch.zeros(2))


def test_euti_no_visual_tokens() -> None:
    none = torch.zeros(4, dtype=torch.bool)
    got = euti_scores(torch.randn(2, 4, 3), torch.randn(1, 4, 3), torch.randn(4, 5), none, none)
    assert got.shape == (0,)


def test_euti_select_ties_by_lower_index() -> None:
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0])
    # Top two are the 3.0s at 1 and 3; the 2.0s at 2, 4, 5 are taken in that order.
    assert euti_select(scores, 3).tolist() == [1, 2, 3]
    assert euti_select(scores, 4).tolist() == [1, 2, 3, 4]
    assert euti_select(torch.full((5,), 0.5), 2).tolist() == [0, 1]
    # int(N * λ) = 0: the reference's threshold is sorted_scores[n_keep - 1] = sorted_scores[-1], the minimum,
    # and it keeps every score above it (then fills ties up to n_keep = 0: none): all but the lowest token
    thr = sorted(scores.tolist(), reverse=True)[0 - 1]
    assert euti_select(scores, 0).tolist() == [i for i, v in enumerate(scores.tolist()) if v > thr] == [1, 2, 3, 4, 5]
    assert euti_select(torch.full((4,), 0.5), 0).tolist() == []
    assert euti_select(scores, 6).tolist() == list(range(6))
    assert euti_select(scores, 100).tolist() == list(range(6))
    assert euti_select(torch.zeros(0), 3).tolist() == []
    assert euti_select(scores, 3).dtype == torch.long


@FAST
@given(scores=st.lists(st.integers(0, 4), max_size=40), n_keep=st.integers(0, 45))
def test_euti_select_matches_threshold_rule(scores: list[int], n_keep: int) -> None:
    # The reference's rule literally: thr = sorted_scores[n_keep - 1] (index -1, the minimum, when n_keep is 0);
    # keep s > thr, then fill with s == thr by ascending index while fewer than n_keep are kept.
    n = len(scores)
    kept: list[int] = []
    if n_keep >= n:
        kept = list(range(n))
    else:
        thr = sorted(scores, reverse=True)[n_keep - 1]
        kept = [i for i in range(n) if scores[i] > thr]
        kept += [i for i in range(n) if scores[i] == thr][: max(0, n_keep - len(kept))]
    got = euti_select(torch.tensor(scores, dtype=torch.float32), n_keep)
    assert got.tolist() == sorted(kept)


# --------------------------------------------------------------------------------------------------------
# Argument validation.


@pytest.mark.parametrize(
    "call",
    [
        lambda: dbdpc(torch.randn(4, 3), -0.1),
        lambda: dbdpc(torch.randn(4, 3), math.nan),
        lambda: dbdpc(torch.randn(4), 0.1),
        lambda: dbdpc(torch.randn(4, 0), 0.1),
        lambda: dbdpc(torch.randn(4, 3), 0.1, density_dc=0.0),
        lambda: dbdpc(torch.tensor([[1.0, math.nan]]), 0.1),
        lambda: retrieve_pruned(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), 0.1),
        lambda: retrieve_pruned(torch.randn(2, 3), torch.randn(3, 3), torch.tensor([0, 1]), 0.1),
        lambda: retrieve_pruned(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), -1.0),
        lambda: retrieve_pruned(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), 0.1, alpha=-1),
        lambda: euti_scores(
            torch.randn(3, 4, 2),
            torch.randn(2, 4, 2),
            torch.randn(4, 5),
            torch.ones(4, dtype=torch.bool),
            torch.ones(4, dtype=torch.bool),
        ),
        lambda: euti_scores(
            torch.randn(2, 4, 2),
            torch.randn(1, 5, 2),
            torch.randn(4, 5),
            torch.ones(4, dtype=torch.bool),
            torch.ones(4, dtype=torch.bool),
        ),
        lambda: euti_scores(
            torch.randn(2, 4, 2),
            torch.randn(1, 4, 2),
            torch.randn(3, 5),
            torch.ones(4, dtype=torch.bool),
            torch.ones(4, dtype=torch.bool),
        ),
        lambda: euti_scores(
            torch.randn(2, 4, 2),
            torch.randn(1, 4, 2),
            torch.randn(4, 5),
            torch.tensor([True, False, False, False]),
            torch.tensor([False, True, False, False]),
        ),
        lambda: euti_scores(
            torch.randn(2, 4, 2),
            torch.randn(1, 4, 2),
            torch.randn(4, 5),
            torch.ones(4),
            torch.ones(4, dtype=torch.bool),
        ),
        lambda: euti_select(torch.randn(4), -1),
        lambda: euti_select(torch.randn(2, 2), 1),
        lambda: euti_select(torch.tensor([1.0, math.nan]), 1),
        lambda: euti_keep_count(10, 1.5),
        lambda: merge_clusters(torch.randn(3, 2), torch.tensor([0, 0, 2]), torch.tensor([0])),
        lambda: merge_clusters(torch.randn(3, 2), torch.tensor([0, 0, 0]), torch.tensor([0, 2])),
        lambda: merge_clusters(torch.randn(3, 2), torch.tensor([2, 1, 2]), torch.tensor([2, 1])),
        lambda: merge_clusters(torch.randn(3, 2), torch.tensor([0, 0]), torch.tensor([0])),
        lambda: merge_clusters(torch.randn(2, 2), torch.tensor([0, 0]), torch.tensor([0]), torch.randn(1, 2)),
        lambda: merge_clusters(
            torch.randn(2, 2), torch.tensor([0, 0]), torch.tensor([0]), torch.randn(1, 2), torch.tensor([1])
        ),
        lambda: merge_clusters(
            torch.randn(2, 2), torch.tensor([0, 0]), torch.tensor([0]), torch.randn(1, 3), torch.tensor([0])
        ),
    ],
)
def test_invalid_arguments_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()
