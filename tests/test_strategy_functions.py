"""Property-based tests of the pure LLM-side strategy functions over random shapes, dtypes and edge cases."""

from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokcomp.strategies.baselines import random_keep
from tokcomp.strategies.fastv import fastv_keep
from tokcomp.strategies.spu import cascade_keep, hamming_lowpass, lowpass, spu_scores

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def tokens(draw, max_n=40):
    n = draw(st.integers(0, max_n))
    d = draw(st.integers(1, 24))
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["random", "identical", "zeros", "huge"]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if kind == "identical" and n:
        x = x[:1].expand(n, d).clone()
    elif kind == "zeros":
        x = torch.zeros(n, d)
    elif kind == "huge":
        x = x * 1e4
    groups = torch.randint(0, 3, (n,), generator=g).sort().values
    return x.to(dtype), groups


@settings(max_examples=60, deadline=None)
@given(tokens(), st.floats(0.01, 1.0), st.sampled_from(["tokens", "hidden", "grid"]),
       st.sampled_from(["lowpass_share", "residual"]))
def test_spu_scores_finite_and_one_per_token(data, cutoff, axis, score):
    x, groups = data
    n = x.shape[0]
    coords = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) // 4, torch.arange(n) % 4], 1)
    s = spu_scores(x, cutoff, axis=axis, score=score, groups=groups, coords=coords)
    assert s.shape == (n,) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    if score == "lowpass_share" and n:
        assert (s >= -1e-4).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.floats(0.0, 1.0))
def test_hamming_window_is_a_lowpass(n, cutoff):
    w = hamming_lowpass(n // 2 + 1, n, cutoff)
    assert w[0] == 1.0
    assert ((w >= 0) & (w <= 1)).all()
    assert (w[1:][:-1] >= w[1:][1:] - 1e-6).all(), "non-increasing with frequency"


def test_lowpass_keeps_constant_signals_and_removes_alternation():
    const = torch.ones(16, 3)
    torch.testing.assert_close(lowpass(const, 0.3, dim=0), const)
    alt = torch.tensor([1.0, -1.0] * 8)[:, None]
    assert lowpass(alt, 0.5, dim=0).abs().max() < 1e-5  # Nyquist is above any cutoff < 1


def _dft_lowpass_matrix(n: int, cutoff: float) -> torch.Tensor:
    """The circular low-pass as a dense ``n x n`` matrix, written from the DFT's definition in float64."""
    w = hamming_lowpass(n // 2 + 1, n, cutoff).double()
    full = torch.cat([w, w[1:(n + 1) // 2].flip(0)])  # real even window over all n bins
    k = torch.arange(n, dtype=torch.float64)
    F = torch.exp(-2j * math.pi * k[:, None] * k[None, :] / n)
    return (F.conj().T @ torch.diag(full.to(torch.complex128)) @ F / n).real


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 7, 65, 97, 127, 128, 131, 150, 193, 240, 257]), st.floats(0.02, 1.0))
def test_lowpass_is_the_dft_filter_for_every_length(n, cutoff):
    # Lengths with large prime factors take the padded-convolution path; it must equal the length-n DFT filter.
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
    want = _dft_lowpass_matrix(n, cutoff) @ x.double()
    torch.testing.assert_close(lowpass(x, cutoff, dim=0).double(), want, atol=2e-5, rtol=1e-4)


def test_spu_prefers_smooth_tokens():
    # a smooth ramp with one spike: the spike carries high-frequency energy and scores lowest
    x = torch.linspace(0, 1, 32)[:, None].repeat(1, 4) + 1.0
    x[10] += torch.tensor([5.0, -5.0, 5.0, -5.0])
    s = spu_scores(x, 0.3)
    assert int(s.argmin()) == 10


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 500), st.integers(0, 30), st.integers(0, 30), st.sampled_from(["linear", "geometric"]))
def test_cascade_is_monotone_and_reaches_zero(n0, first, length, schedule):
    last = first + length
    counts = [cascade_keep(n0, t, first, last, schedule) for t in range(first, last + 1)]
    assert counts[-1] == 0
    assert all(0 <= c <= n0 for c in counts)
    assert all(a >= b for a, b in itertools.pairwise(counts))
    if schedule == "linear" and length:
        assert counts[0] == math.ceil(n0 * length / (length + 1))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 50), st.integers(-3, 60), DTYPES, st.booleans())
def test_fastv_keep_valid_indices_ties_to_lower_index(n, k, dtype, ties):
    s = torch.zeros(n) if ties else torch.randn(n)
    keep = fastv_keep(s.to(dtype), k)
    assert keep.numel() == max(0, min(k, n))
    assert (keep[1:] > keep[:-1]).all()
    if ties:
        assert keep.tolist() == list(range(keep.numel()))
    elif keep.numel():
        others = torch.ones(n, dtype=torch.bool)
        others[keep] = False
        if others.any():
            assert s.to(dtype)[keep].min() >= s.to(dtype)[others].max()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 80), st.integers(0, 90), st.integers(0, 1000))
def test_random_keep_seeded_and_valid(n, k, seed):
    a = random_keep(n, k, seed)
    assert torch.equal(a, random_keep(n, k, seed))
    assert a.numel() == min(k, n)
    assert (a[1:] > a[:-1]).all() and (a < max(n, 1)).all()


@settings(max_examples=30, deadline=None)
@given(tokens(max_n=30), st.floats(0.05, 1.0), st.sampled_from(["lowpass_share", "residual"]))
def test_token_axis_scores_equal_filtering_each_item(data, cutoff, score):
    """The fast channels-first path against the plain definition: filter each item along tokens."""
    x, groups = data
    s = spu_scores(x, cutoff, score=score, groups=groups)
    xf = x.float()
    want = torch.empty(x.shape[0])
    for g in torch.unique(groups):
        sel = groups == g
        low = lowpass(xf[sel], cutoff, dim=0)
        if score == "lowpass_share":
            e = (xf[sel] ** 2).sum(1)
            want[sel] = torch.where(e > 0, (low**2).sum(1) / e.clamp(min=1e-12), torch.ones_like(e))
        else:
            want[sel] = -((xf[sel] - low) ** 2).sum(1)
    torch.testing.assert_close(s, want, atol=1e-4, rtol=1e-3)
