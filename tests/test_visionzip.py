"""VisionZip: the tensor functions against a loop written from the specification (methods-2025.md §2), and
the strategy through the real models (batch equals samples is in the matrix, test_adapters_matrix.py).

The model oracle on LLaVA-1.5: the features the LLM receives equal the projector applied to the reference
computation on the *unpatched* tower's tensors: ``hidden_states[-2]`` (CLS included), the CLS row of the
previous block's eager ``output_attentions``, and that block's ``k_proj`` keys averaged over heads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import cached_model

import tokcomp as tc
from tokcomp import testing
from tokcomp.strategies import VisionZip
from tokcomp.strategies.visionzip import visionzip_counts, visionzip_merge, visionzip_select


def reference(scores, x, metric, dominant_num, contextual_num, cls=None):
    """The spec's steps 2.2-2.3, one token at a time (ties: the lower index; no eps in the norm)."""
    n = len(scores)
    top = sorted(range(n), key=lambda j: (-float(scores[j]), j))[:dominant_num]
    dom = sorted(top)
    rest = [j for j in range(n) if j not in top]
    out = [] if cls is None else [cls]
    out += [x[j] for j in dom]
    if not rest or contextual_num == 0:
        return torch.stack(out), dom, []
    step = max(1, len(rest) // contextual_num)
    tpos = list(range(0, len(rest), step))[:contextual_num]
    targets = [rest[p] for p in tpos]
    groups = {t: [] for t in targets}
    for p, j in enumerate(rest):
        if p in tpos:
            continue
        mj = metric[j] / metric[j].norm()
        sims = [float(mj @ (metric[t] / metric[t].norm())) for t in targets]
        best = max(range(len(sims)), key=lambda i: (sims[i], -i))
        groups[targets[best]].append(j)
    for t in targets:
        members = groups[t]
        extra = sum((x[i] for i in members), torch.zeros_like(x[t])) / max(1, len(members))
        out.append(x[t] + extra)
    return torch.stack(out), dom, targets


CASES = [(16, 4, 3), (16, 5, 4), (30, 7, 5), (12, 1, 11), (9, 3, 0)]


@pytest.mark.parametrize(("n", "d", "c"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_merge_equals_the_spec_on_random_inputs(n, d, c, seed):
    g = torch.Generator().manual_seed(seed)
    scores, x, metric = torch.rand(n, generator=g), torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)
    cls = torch.randn(6, generator=g)
    ref, dom, targets = reference(scores, x, metric, d, c, cls)
    res = visionzip_merge(x, scores, metric, d, c, cls)
    torch.testing.assert_close(res.x, ref)
    assert res.dominant.tolist() == dom and res.targets.tolist() == targets


def test_degenerate_inputs():
    # identical tokens: dominant ties go to the lowest indices, every member joins the first target
    x, s, m = torch.ones(8, 4), torch.full((8,), 0.5), torch.ones(8, 3)
    res = visionzip_merge(x, s, m, 3, 2)
    assert res.dominant.tolist() == [0, 1, 2] and res.targets.tolist() == [3, 5]
    ref, _, _ = reference(s, x, m, 3, 2)
    torch.testing.assert_close(res.x, ref)
    # a budget at or above the candidates: every token kept once, nothing merged
    g = torch.Generator().manual_seed(3)
    x, s, m = torch.randn(6, 4, generator=g), torch.rand(6, generator=g), torch.randn(6, 3, generator=g)
    d, c = visionzip_counts(6, 50, 50)
    assert (d, c) == (6, 0)
    res = visionzip_merge(x, s, m, d, c)
    assert sorted(res.dominant.tolist()) == list(range(6))
    torch.testing.assert_close(res.x, x)
    d, c = visionzip_counts(6, 3, 50)
    res = visionzip_merge(x, s, m, d, c)
    kept = res.dominant.tolist() + res.targets.tolist()
    assert sorted(kept) == list(range(6)) and len(set(kept)) == 6
    # one token
    res = visionzip_merge(torch.randn(1, 4), torch.rand(1), torch.randn(1, 3), *visionzip_counts(1, 54, 10))
    assert res.dominant.tolist() == [0] and res.targets.numel() == 0


def test_counts():
    assert visionzip_counts(576, 54, 10, cls=True) == (53, 10)   # README: 54 + 10 = 64 tokens with the CLS
    assert visionzip_counts(576, 54, 10) == (54, 10)
    assert visionzip_counts(16, 54, 10, cls=True) == (15, 0)     # clamped: the CLS copy takes a place
    assert visionzip_counts(100, 1, 1, dominant_ratio=0.3, contextual_ratio=0.001) == (30, 1)
    for n in (1, 5, 16, 40):
        for d, c in ((1, 0), (3, 2), (54, 10)):
            a, b = visionzip_counts(n, d, c, cls=True)
            e, f = visionzip_counts(n, d, c, cls=False)
            assert 1 + a + b == e + f == min(max(d, 1) + c, n)


def test_select_groups_are_valid():
    g = torch.Generator().manual_seed(5)
    s, m = torch.rand(20, generator=g), torch.randn(20, 4, generator=g)
    dom, targets, group = visionzip_select(s, m, 5, 4)
    assert len(set(dom.tolist()) | set(targets.tolist())) == 9
    assert bool((group[dom] == -1).all()) and group[targets].tolist() == [0, 1, 2, 3]
    rest = [j for j in range(20) if j not in dom.tolist()]
    assert all(0 <= int(group[j]) < 4 for j in rest)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llava_features_equal_the_reference_on_the_unpatched_tower(attn):
    model = cached_model("llava", attn)
    batch = testing.tiny_inputs("llava", [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]])
    d, c = 5, 3
    with torch.no_grad(), tc.compress(model, [tc.Stage(VisionZip(dominant=d, contextual=c), site="encoder")]) as run:
        model(**batch)
        got = torch.stack([f for r in run._state.vision for f in r.features])
    eager = cached_model("llava", "eager")
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
        layers = getattr(tower, "vision_model", tower).encoder.layers
        depth = len(layers)
        block = layers[depth - 2]
        x = out.hidden_states[-2]
        keys = block.self_attn.k_proj(block.layer_norm1(out.hidden_states[depth - 2]))
        heads = tower.config.num_attention_heads
        keys = keys.view(*keys.shape[:2], heads, -1).mean(2)
        attn_rows = out.attentions[-2][:, :, 0, 1:].sum(1)  # the CLS row over the patches, summed over heads
        ref = []
        for j in range(x.shape[0]):
            tokens, _, _ = reference(attn_rows[j], x[j, 1:], keys[j, 1:], d - 1, c, cls=x[j, 0])
            ref.append(model.model.multi_modal_projector(tokens))
    torch.testing.assert_close(got, torch.stack(ref), atol=2e-5, rtol=1e-4)


SITES = [("llava", "encoder"), ("llava", "projector"), ("qwen2_vl", "projector"), ("qwen2_5_vl", "projector"),
         ("internvl", "projector"), ("qwen3_vl", "projector")]


@pytest.mark.parametrize(("arch", "site"), SITES)
def test_sdpa_equals_eager(arch, site):
    batch = testing.tiny_inputs(arch, [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]])
    out, tokens = {}, {}
    for attn in ("sdpa", "eager"):
        model = cached_model(arch, attn)
        with torch.no_grad(), tc.compress(model, [tc.Stage(VisionZip(dominant=4, contextual=2), site=site)]) as run:
            out[attn] = model(**batch).logits[:, -1]
        tokens[attn] = run.report().original_visual
    assert tokens["sdpa"] == tokens["eager"] and max(tokens["sdpa"]) < min(run.report().uncompressed_visual)
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=2e-4, rtol=1e-4)


def test_placement_errors():
    llava, qwen = cached_model("llava"), cached_model("qwen2_vl")
    with pytest.raises(tc.ScheduleError, match="one encoder block >= 1"):
        tc.compress(llava, [tc.Stage(VisionZip(), site="encoder", layers=[0])])
    with pytest.raises(tc.ScheduleError, match="divisible by 2"):
        tc.compress(qwen, [tc.Stage(VisionZip(), site="encoder")])
    with pytest.raises(tc.ScheduleError, match="contextual"):
        tc.compress(qwen, [tc.Stage(VisionZip(contextual=-1), site="projector")])


def test_preset_runs_on_qwen_and_llava():
    for arch in ("qwen2_vl", "llava"):
        model = cached_model(arch)
        batch = testing.tiny_inputs(arch, [[testing.make_image(224, 168, seed=1)]])
        with torch.no_grad(), tc.compress(model, tc.Schedule.preset("visionzip-qwen" if arch != "llava" else "visionzip")) as run:
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        rep = run.report()
        assert rep.original_visual[0] < rep.uncompressed_visual[0]


def test_keys_normalised_with_eps():
    """A zero key is at similarity 0 from every target (the reference gives NaN) and joins the first one."""
    m = torch.randn(6, 3)
    m[4] = 0
    _, targets, group = visionzip_select(torch.arange(6.0), m, 1, 2)
    assert int(group[4]) == 0 and F.normalize(m, dim=-1)[4].abs().sum() == 0
