"""CDPruner's kernel and greedy MAP against independent computations (methods-2025.md §4.2-4.3).

* The greedy MAP is checked against its definition, not against the incremental Cholesky: at each step the item
  that maximises ``det L[S ∪ {j}]`` (a float64 determinant per candidate).
* The reference's own fast greedy, transcribed with its NaN behaviour, shows what tokcomp does differently on
  rank-exhausted inputs: fewer than T unique indices there, exactly T here.
"""

from __future__ import annotations

import pytest
import torch
from tokcomp.strategies import CDPruner
from tokcomp.strategies.cdpruner import (
    cdpruner_kernel,
    fast_greedy_map,
    instruction_relevance,
    normalize_relevance,
)

import tokcomp as tc
from tokcomp import testing


def greedy_by_determinants(L: torch.Tensor, k: int) -> list[int]:
    L = L.double()
    chosen: list[int] = []
    for _ in range(k):
        best, arg = -1.0, None
        for j in range(L.shape[0]):
            if j in chosen:
                continue
            idx = chosen + [j]
            det = float(torch.linalg.det(L[idx][:, idx]))
            if det > best:
                best, arg = det, j
        chosen.append(arg)
    return chosen


def reference_fast_map(L: torch.Tensor, T: int) -> list[int]:
    """The reference's loop (no stopping rule): NaN residuals make argmax return the first NaN."""
    n = L.shape[0]
    d2 = torch.diagonal(L).clone()
    c = torch.zeros(T, n)
    out = []
    for i in range(T):
        j = int(torch.argmax(d2))
        out.append(j)
        e = (L[j] - c[:i, j] @ c[:i]) / torch.sqrt(d2[j])
        c[i] = e
        d2 = d2 - e**2
        d2[j] = float("-inf")
    return out


def kernel_by_loops(F: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    n = F.shape[0]
    L = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            fi, fj = F[i].double(), F[j].double()
            L[i, j] = r[i] * (fi @ fj) / (fi.norm() * fj.norm()) * r[j]
    return L


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("n", "dim", "k"), [(12, 16, 5), (20, 8, 8), (9, 32, 9)])
def test_greedy_map_maximises_the_determinant_step_by_step(seed, n, dim, k):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(n, dim, generator=g)
    r = normalize_relevance(torch.rand(n, generator=g))
    L = cdpruner_kernel(F, r)
    torch.testing.assert_close(L.double(), kernel_by_loops(F, r), atol=1e-5, rtol=1e-5)
    got, filled = fast_greedy_map(L, k)
    assert filled == 0
    assert got.tolist() == greedy_by_determinants(L, k)
    assert got.tolist() == reference_fast_map(L, k)  # full rank: the reference agrees


def test_rank_exhausted_input_keeps_t_unique_tokens():
    """T = N with features of rank 4: the reference's picks turn to NaN and repeat 0/1; tokcomp fills."""
    g = torch.Generator().manual_seed(0)
    F = torch.randn(16, 4, generator=g)
    r = normalize_relevance(torch.rand(16, generator=g))
    L = cdpruner_kernel(F, r)
    ref = reference_fast_map(L, 16)
    assert len(set(ref)) < 16
    got, filled = fast_greedy_map(L, 16, fill=r)
    assert sorted(got.tolist()) == list(range(16))
    assert filled >= 16 - 4
    # the greedy part spans the features; the fill is by descending relevance
    greedy, rest = got[: 16 - filled], got[16 - filled:]
    assert torch.linalg.matrix_rank(F[greedy].double()) == len(greedy)
    assert torch.equal(rest, torch.sort(r.masked_fill(torch.isin(torch.arange(16), greedy), -1), descending=True,
                                        stable=True).indices[:filled])


def test_identical_tokens_and_degenerate_budgets():
    F = torch.ones(6, 5)
    r = torch.ones(6)
    got, filled = fast_greedy_map(cdpruner_kernel(F, r), 4, fill=r)
    assert got.tolist() == [0, 1, 2, 3] and filled == 3
    F = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert sorted(fast_greedy_map(cdpruner_kernel(F, torch.ones(5)), 50)[0].tolist()) == list(range(5))
    assert fast_greedy_map(cdpruner_kernel(F[:1], torch.ones(1)), 3)[0].tolist() == [0]
    assert fast_greedy_map(cdpruner_kernel(F, torch.ones(5)), 0)[0].numel() == 0


def test_relevance_and_its_normalisation():
    g = torch.Generator().manual_seed(2)
    vis, txt = torch.randn(7, 6, generator=g), torch.randn(3, 6, generator=g)
    by_hand = torch.tensor([
        sum(float(torch.nn.functional.cosine_similarity(vis[i], txt[m], dim=0)) for m in range(3)) / 3
        for i in range(7)
    ])
    torch.testing.assert_close(instruction_relevance(vis, txt), by_hand)
    torch.testing.assert_close(instruction_relevance(vis, txt, negate=True), -by_hand)
    r = normalize_relevance(by_hand)
    lo, hi = by_hand.min(), by_hand.max()
    torch.testing.assert_close(r, (by_hand - lo + 1e-6) / (hi - lo))
    assert torch.equal(normalize_relevance(torch.full((4,), 0.3)), torch.ones(4))


def test_strategy_keeps_t_per_image_and_reads_the_text_after_the_image():
    """On the LLaVA tiny model (two images of 16 tokens): T = 4 per image; the selection is the DPP over the
    layer-0 embeddings with relevance to the embeddings of the text after the last image, recomputed here."""
    from conftest import cached_model

    model = cached_model("llava")
    batch = testing.tiny_inputs(
        "llava", [[testing.make_image(224, 168, seed=1), testing.make_image(100, 100, seed=2)]]
    )
    seen = {}

    class Probe(CDPruner):
        def select(self, view):
            seen["p"] = view.projections()
            seen["x"] = view.hidden
            seen["decision"] = super().select(view)
            return seen["decision"]

    with torch.no_grad(), tc.compress(model, [tc.Stage(Probe(keep=4), site="llm")]) as run:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert run.report().visual_tokens[0] == [8]
    p, x = seen["p"], seen["x"]
    embeds = model.get_input_embeddings()(batch["input_ids"][0])
    torch.testing.assert_close(p.hidden[~p.visual], embeds[~torch.isin(torch.arange(embeds.shape[0]),
                                                                       torch.nonzero(p.visual).squeeze(1))])
    last = int(p.visual.nonzero().max())
    text = p.hidden[last + 1:]
    r = normalize_relevance(instruction_relevance(x, text))
    expected = []
    for item in range(2):
        members = torch.arange(16 * item, 16 * item + 16)
        sel = greedy_by_determinants(kernel_by_loops(x[members], r[members]), 4)
        expected += (members[sel]).tolist()
    assert seen["decision"].keep.tolist() == sorted(expected)


def test_reference_layout_normalises_over_the_batch():
    """The reference's layout: relevance is minus the CLIP similarity, min-max normalised over every image of
    the call, so one image's selection depends on the other's; the strategy normalises per sample instead."""
    from tokcomp.strategies.cdpruner import cdpruner_reference_masks

    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 24, 16, generator=g)
    embeds = torch.randn(2, 24, 8, generator=g)
    text = torch.randn(2, 8, generator=g)
    masks = cdpruner_reference_masks(feats, embeds, text, 6)
    assert masks.sum(1).tolist() == [6, 6]
    r = -torch.stack([
        torch.tensor([float(torch.nn.functional.cosine_similarity(embeds[b, i], text, dim=-1).mean())
                      for i in range(24)]) for b in range(2)
    ])
    r = (r - r.min() + 1e-6) / (r.max() - r.min())
    for b in range(2):
        expected = greedy_by_determinants(kernel_by_loops(feats[b], r[b]), 6)
        assert sorted(masks[b].nonzero().squeeze(1).tolist()) == sorted(expected)
    alone = cdpruner_reference_masks(feats[:1], embeds[:1], text, 6)
    assert alone.shape == (1, 24) and int(alone.sum()) == 6
