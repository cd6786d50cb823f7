"""DivPrune's selection against a slow reference written from the specification (methods-2025.md §3.2).

`reference_divprune` is a loop-by-loop transcription of the reference code's algorithm, quirks included
(Python rounding of the budget, the first pick by nearest-neighbour distance, no masking of selected tokens),
computed in float64 so that rounding does not decide the comparisons. tokcomp must equal it wherever the
reference returns unique indices, and return valid unique indices where it does not.
"""

from __future__ import annotations

import pytest
import torch
from tokcomp.strategies import DivPrune
from tokcomp.strategies.divprune import divprune_budget, divprune_select

import tokcomp as tc
from tokcomp import testing
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens


def reference_divprune(x: torch.Tensor, ratio: float) -> list[int]:
    """The reference's steps, one Python loop per operation."""
    n = x.shape[0]
    k = round(ratio * n)
    rows = [x[i].double() / x[i].double().norm() for i in range(n)]
    dist = [[1.0 - float(rows[i] @ rows[j]) for j in range(n)] for i in range(n)]
    selected: list[int] = []
    if k == 0:
        return selected
    # first pick: the column whose second-smallest entry is largest
    second = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
    selected.append(max(range(n), key=lambda j: (second[j], -j)))
    for _ in range(1, k):
        score = [min(dist[s][j] for s in selected) for j in range(n)]  # selected tokens not masked
        selected.append(max(range(n), key=lambda j: (score[j], -j)))
    return selected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "dim", "ratio"), [(20, 8, 0.25), (33, 16, 0.098), (12, 3, 0.5), (7, 32, 0.9)])
def test_random_inputs_equal_the_reference(seed, n, dim, ratio):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    ref = reference_divprune(x, ratio)
    got = divprune_select(x, divprune_budget(n, ratio))
    if len(set(ref)) == len(ref) and ref:
        assert got.tolist() == ref
    assert len(set(got.tolist())) == got.numel()


def test_budget_uses_python_rounding_and_clamps():
    assert divprune_budget(576, 0.098) == 56  # the reference's default setting
    assert divprune_budget(25, 0.1) == 2  # round(2.5) == 2 (ties to even), as the reference
    assert divprune_budget(35, 0.1) == 4  # round(3.5) == 4
    assert divprune_budget(4, 0.1) == 1  # the reference would keep none
    assert divprune_budget(10, 1.0) == 10 and divprune_budget(10, 0.5, keep=50) == 10
    assert divprune_budget(0, 0.5) == 0


def test_identical_tokens_give_unique_indices_where_the_reference_repeats():
    x = torch.ones(5, 4)
    assert reference_divprune(x, 1.0) == [0, 0, 0, 0, 0]  # the reference re-selects
    assert divprune_select(x, 5).tolist() == [0, 1, 2, 3, 4]


def test_duplicated_tokens_are_taken_last():
    """Two copies of three distinct directions: the greedy takes each direction once before any copy."""
    base = torch.eye(3)
    x = torch.cat([base, base])
    got = divprune_select(x, 6).tolist()
    assert sorted(got[:3]) == [0, 1, 2] and sorted(got) == list(range(6))


def test_budget_at_or_above_the_candidates_and_one_token():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    assert sorted(divprune_select(x, 6).tolist()) == list(range(6))
    assert sorted(divprune_select(x, 60).tolist()) == list(range(6))
    assert divprune_select(x[:1], 1).tolist() == [0]
    assert divprune_select(x[:1], 5).tolist() == [0]
    assert divprune_select(x, 0).numel() == 0


def test_zero_vector_is_far_from_everything_not_nan():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    x[2] = 0
    got = divprune_select(x, 3).tolist()
    assert len(set(got)) == 3 and 2 in got


def _tokens(frames: list[FrameGrid]) -> VisualTokens:
    return VisualTokens([VisualItemTokens("image", [f], (1, *f.shape)) for f in frames], "projector", 0, 0, (0,))


def test_strategy_keeps_the_selection_in_original_order_with_provenance():
    g = torch.Generator().manual_seed(3)
    fr = FrameGrid.fresh(torch.randn(4, 5, 8, generator=g))
    out = DivPrune(keep_ratio=0.3).reduce(_tokens([fr])).items[0].frames[0]
    keep = divprune_select(fr.x.reshape(20, 8), 6).sort().values
    assert out.shape == (1, 6) and not out.is_grid
    torch.testing.assert_close(out.x[0], fr.x.reshape(20, 8)[keep])
    torch.testing.assert_close(out.pos[0], fr.pos.reshape(20, 2)[keep])  # original (row, col) positions
    expected_owner = torch.full((20,), -1)
    expected_owner[keep] = torch.arange(6)
    assert torch.equal(out.owner, expected_owner)


def test_generate_on_llava_keeps_the_budget_per_image():
    """Through generate() on the LLaVA tiny model: each image's 16 tokens become round(0.25 * 16) = 4."""
    from conftest import cached_model

    model = cached_model("llava")
    images = [[testing.make_image(224, 168, seed=1), testing.make_image(100, 100, seed=2)]]
    batch = testing.tiny_inputs("llava", images)
    with torch.no_grad(), tc.compress(model, [tc.Stage(DivPrune(keep_ratio=0.25), site="projector")]) as run:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    rep = run.report()
    assert rep.uncompressed_visual == [32] and rep.original_visual == [8]
