"""VScan: the scans and the merge against loops written from the specification (methods-2025.md §5), the
predicted counts against the selection, and the preset (scan at the projector, FastV at half depth) through
generate(): batch equals samples, sdpa equals eager. The adapter matrix runs the strategy alone everywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model

import tokcomp as tc
from tokcomp import testing
from tokcomp.contracts import AttentionSite, EncoderAttention
from tokcomp.strategies import VScan
from tokcomp.strategies.vscan import vscan_count, vscan_merge, vscan_select, vscan_windows


def reference_select(shallow, deep, h, w, window, T):
    """Local: per window the top ⌊T/2⌋ // windows by the shallow map; global: the top T − ⌊T/2⌋ of the rest."""
    if T >= h * w:
        return list(range(h * w))
    wins = {}
    for r in range(h):
        for c in range(w):
            wins.setdefault((r // window, c // window), []).append(r * w + c)
    per = (T // 2) // len(wins)
    picked = []
    for key in sorted(wins):
        members = sorted(wins[key], key=lambda j: (-float(shallow[j]), j))
        picked += members[:per]
    others = sorted((j for j in range(h * w) if j not in picked), key=lambda j: (-float(deep[j]), j))
    picked += others[: T - T // 2]
    return sorted(picked)


def reference_merge(x, selected):
    """Each other token joins its most cosine-similar selected token (the first on ties); plain group mean."""
    groups = {s: [s] for s in selected}
    for j in range(x.shape[0]):
        if j in groups:
            continue
        sims = [float(torch.nn.functional.cosine_similarity(x[j], x[s], dim=0)) for s in selected]
        best = max(range(len(sims)), key=lambda i: (sims[i], -i))
        groups[selected[best]].append(j)
    return torch.stack([x[groups[s]].mean(0) for s in selected])


@pytest.mark.parametrize(("h", "w", "window", "T"), [(8, 8, 4, 12), (6, 9, 3, 10), (5, 7, 2, 9), (4, 4, 6, 5),
                                                     (24, 24, 6, 96), (3, 3, 1, 40)])
@pytest.mark.parametrize("seed", [0, 1])
def test_scans_and_merge_equal_the_spec(h, w, window, T, seed):
    g = torch.Generator().manual_seed(seed)
    n = h * w
    shallow, deep, x = torch.rand(n, generator=g), torch.rand(n, generator=g), torch.randn(n, 5, generator=g)
    sel = vscan_select(shallow, deep, vscan_windows(h, w, window), T)
    assert sel.tolist() == reference_select(shallow, deep, h, w, window, T)
    assert sel.unique().numel() == sel.numel() == vscan_count(h, w, window, T)
    merged, assign = vscan_merge(x, sel)
    torch.testing.assert_close(merged, reference_merge(x, sel.tolist()))
    assert assign[sel].tolist() == list(range(sel.numel()))


def test_degenerate_inputs():
    # identical maps and tokens: ties go to the lower index, everything joins the first selected token
    n = 16
    sel = vscan_select(torch.ones(n), torch.ones(n), vscan_windows(4, 4, 2), 8)
    assert sel.tolist() == reference_select(torch.ones(n), torch.ones(n), 4, 4, 2, 8)
    merged, assign = vscan_merge(torch.ones(n, 3), sel)
    torch.testing.assert_close(merged, torch.ones(8, 3))
    assert assign.tolist() == [0 if j not in sel.tolist() else sel.tolist().index(j) for j in range(n)]
    # a budget at or above the tokens: every token once (the reference's zeroed map would select some again)
    sel = vscan_select(torch.rand(6), torch.rand(6), vscan_windows(2, 3, 1), 50)
    assert sel.tolist() == list(range(6))
    # one token
    assert vscan_select(torch.rand(1), torch.rand(1), vscan_windows(1, 1, 6), 96).tolist() == [0]
    merged, assign = vscan_merge(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))
    assert merged.tolist() == [[2.0, -1.0]] and assign.tolist() == [0]


def test_blocks_follow_the_reference():
    # LLaVA-1.5's CLIP ViT-L: the CLS rows of blocks 5 and 22 of 24; no CLS: received attention
    assert VScan().attention_needs(AttentionSite("projector", 24, 24, True)) == (
        EncoderAttention(5, "cls"), EncoderAttention(22, "cls"))
    assert VScan(shallow_block=7, deep_block=31).attention_needs(AttentionSite("projector", 32, 32, False)) == (
        EncoderAttention(7, "mean"), EncoderAttention(31, "mean"))


def _two_images(arch):
    return testing.tiny_inputs(arch, [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]])


@pytest.mark.parametrize(("arch", "attn"), [("llava", "sdpa"), ("llava", "eager"), ("qwen2_5_vl", "sdpa"),
                                            ("internvl", "eager")])
def test_preset_batch_equals_samples(arch, attn):
    model = cached_model(arch, attn)
    batch = _two_images(arch)
    gen = {"max_new_tokens": 2, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), tc.compress(model, "vscan") as run:
        out = model.generate(**batch, **gen)
        rep = run.report()
        singles = [model.generate(**testing.batch_item(batch, i), **gen) for i in range(2)]
    assert all(a < b for a, b in zip(rep.original_visual, rep.uncompressed_visual))
    for i, single in enumerate(singles):
        for step in range(2):
            torch.testing.assert_close(out.logits[step][i], single.logits[step][0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_sdpa_equals_eager(arch):
    batch = _two_images(arch)
    out = {}
    for attn in ("sdpa", "eager"):
        model = cached_model(arch, attn)
        with torch.no_grad(), tc.compress(model, "vscan"):
            out[attn] = model(**batch).logits[:, -1]
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=2e-4, rtol=1e-4)


def test_placement_errors():
    model = cached_model("qwen2_vl")
    with pytest.raises(tc.ScheduleError, match="window"):
        tc.compress(model, [tc.Stage(VScan(window=0), site="projector")])
    with pytest.raises(tc.ScheduleError, match="block"):
        tc.compress(model, [tc.Stage(VScan(deep_block=99), site="projector")])
    with pytest.raises(tc.ScheduleError):
        tc.compress(cached_model("llava_onevision"), [tc.Stage(VScan(keep=4), site="projector")])
