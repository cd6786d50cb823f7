"""DART's selection against a loop-by-loop transcription of the reference's steps (methods-2025.md §1.2-1.3),
and the runtime's previous-layer keys against a hand computation.

`reference_dart` works on one sample laid out like the reference's input (text, one image span ``[s, s+n)``,
text after it), with absolute sequence indices, a pivot set built with Python's ``set`` from the pivot list, and
cosine similarity by the formula. It knows nothing of tokcomp's function.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import DART
from tokcomp.strategies.dart import dart_per_pivot, dart_select, pivot_visit_order

import tokcomp as tc
from tokcomp import testing


def reference_dart(keys, states, s, n, pivot_image, pivot_text, token_topk, order="set"):
    """Sorted kept indices relative to the image start ``s``; ``keys`` ``(N, H, d)``, ``states`` ``(N, D)``."""
    N = keys.shape[0]
    norm = [float(keys[i].abs().sum()) for i in range(N)]
    img = sorted(range(s, s + n), key=lambda i: (-norm[i], i))[:pivot_image]
    txt = sorted(range(s + n, N), key=lambda i: (-norm[i], i))[:pivot_text]
    visit = set(img + txt) if order == "set" else sorted(img) + sorted(txt)

    def cos(a, b):
        x, y = states[a].double(), states[b].double()
        return float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y)))

    remaining = [i for i in range(s, s + n) if i not in img]
    kept = set(img)
    for p in visit:
        ranked = sorted(remaining, key=lambda v: (cos(p, v), v))  # least similar first
        picked = ranked[:token_topk]
        kept.update(picked)
        remaining = [v for v in remaining if v not in picked]
    return sorted(i - s for i in kept)


def _case(seed, before=5, n=40, after=12, heads=2, d=4, D=16):
    g = torch.Generator().manual_seed(seed)
    N = before + n + after
    keys = torch.randn(N, heads, d, generator=g)
    states = torch.randn(N, D, generator=g)
    visual = torch.zeros(N, dtype=torch.bool)
    visual[before:before + n] = True
    return keys, states, visual


def _tokcomp(keys, states, visual, pi, pt, topk, order="set", offset=0):
    key_norm = keys.reshape(keys.shape[0], -1).abs().sum(-1)
    pos = torch.arange(keys.shape[0]) + offset
    keep, info = dart_select(key_norm, states, visual, pos, pi, pt, topk, order)
    return keep.tolist(), info


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("pi", "pt", "topk"), [(4, 4, 3), (2, 3, 5), (3, 0, 4), (0, 2, 6)])
def test_random_inputs_equal_the_reference(seed, pi, pt, topk):
    keys, states, visual = _case(seed)
    got, info = _tokcomp(keys, states, visual, pi, pt, topk)
    assert got == reference_dart(keys, states, 5, 40, pi, pt, topk)
    assert len(got) == pi + (pi + pt) * topk and info["short"] == 0


def test_the_set_order_changes_the_result_and_is_reproduced():
    """Pivot order matters: over these cases the 'sorted' order keeps another set in some of them, and the
    default reproduces the reference's set order in all of them."""
    differs = 0
    for seed in range(12):
        keys, states, visual = _case(seed, before=35, n=48, after=20)
        got, _ = _tokcomp(keys, states, visual, 4, 4, 4)
        assert got == reference_dart(keys, states, 35, 48, 4, 4, 4, order="set")
        srt, _ = _tokcomp(keys, states, visual, 4, 4, 4, order="sorted")
        assert srt == reference_dart(keys, states, 35, 48, 4, 4, 4, order="sorted")
        differs += srt != got
    assert differs > 0


def test_pivot_visit_order_is_python_set_order():
    for pivots in ([40, 3, 37, 100, 9, 72, 64, 33], [35, 51, 36, 70], [600, 601, 2, 599]):
        assert pivot_visit_order(pivots) == list(set(pivots))
    assert pivot_visit_order([40, 3, 37]) != sorted([40, 3, 37])  # not ascending: 40 % 8 < 3 % 8


def test_kept_counts_of_the_reference_variants():
    assert 4 + 8 * dart_per_pivot(576, 8, 0.5, keep=128) == 132  # LLaVA-1.5 "128" keeps 132
    assert 4 + 8 * dart_per_pivot(576, 8, 0.5, keep=64) == 68
    assert dart_per_pivot(576, 8, 0.222) == 15  # Qwen rule: int(127.87 / 8)
    assert dart_per_pivot(10, 8, 0.5) == 0


def test_degenerate_inputs_give_valid_unique_indices():
    keys, states, visual = _case(0, before=2, n=6, after=2)
    # a budget above the candidates: every visual token, no duplicate (the reference's topk raises)
    got, info = _tokcomp(keys, states, visual, 4, 4, 10)
    assert got == list(range(6)) and info["short"] == 4 + 8 * 10 - 6
    # fewer text tokens after the image than text pivots, fewer visual tokens than image pivots
    got, _ = _tokcomp(keys, states, visual, 9, 5, 0)
    assert got == list(range(6))
    # identical tokens
    same = torch.ones_like(states)
    got, _ = _tokcomp(keys, same, visual, 2, 2, 1)
    assert len(got) == len(set(got)) == 6
    # one visual token, no text after it
    one = torch.zeros(3, dtype=torch.bool)
    one[2] = True
    got, _ = _tokcomp(keys[:3], states[:3], one, 4, 4, 3)
    assert got == [0]


def test_previous_projections_are_the_previous_layers_keys():
    """The runtime's previous-layer keys equal layer K-1's k_proj + RoPE on its own input, recomputed here."""
    model = cached_model("qwen2_vl")
    adapter = tc.find_adapter(model)
    batch = testing.tiny_inputs("qwen2_vl", [[testing.make_image(224, 168, seed=1)]])
    seen: dict = {}

    def grab(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    got: dict = {}

    class Probe(DART):
        def select(self, view):
            got["prev"] = view.previous_projections()
            got["cur"] = view.projections()
            got["normed"] = view.final_norm(got["cur"].hidden)
            return super().select(view)

    handle = adapter.decoder_layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), tc.compress(model, [tc.Stage(Probe(), site="llm", layers=[2])]):
            model(**batch)
    finally:
        handle.remove()
    parts = adapter.attention_parts(1)
    h, (cos, sin) = seen["h"], seen["pe"]
    with torch.no_grad():
        k = parts.k_proj(parts.norm(h)).view(1, h.shape[1], parts.num_kv_heads, parts.head_dim).transpose(1, 2)
        half = k.shape[-1] // 2
        k = k * cos[:, None] + torch.cat([-k[..., half:], k[..., :half]], -1) * sin[:, None]
        torch.testing.assert_close(got["prev"].k_rope, k[0], atol=1e-5, rtol=1e-5)
        norm = model.model.language_model.norm
        torch.testing.assert_close(got["normed"], norm(got["cur"].hidden))
    assert torch.equal(got["cur"].sequence_index, torch.arange(h.shape[1]))
    assert torch.equal(got["prev"].visual, got["cur"].visual)


def test_reference_layout_helper():
    from tokcomp.strategies.dart import dart_reference_keep

    keys, states, _ = _case(5, before=35, n=48, after=20)
    # (1, H, N, d) keys and states scaled as a norm weight would scale them: the reference's inputs
    kept = dart_reference_keep(keys.permute(1, 0, 2)[None], states[None] * 3.0, 35, 48, 4, 4, 4)
    image = [35 + i for i in reference_dart(keys, states, 35, 48, 4, 4, 4)]
    assert kept.tolist() == list(range(35)) + image + list(range(83, 103))
