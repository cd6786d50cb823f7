"""VTW against a hand-written layer-by-layer reference, and the KL search for K."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import VTW
from tokcomp.strategies.vtw import kl_withdrawn_vs_full, search_k

import tokcomp as tc
from tokcomp import testing


def _reference(model, embeds, pos3, visual, k, steps):
    """Greedy decoding written out by hand: no cache, every layer called directly, the visual tokens
    removed before layer k, RoPE from the original positions, new tokens at max position + 1."""
    lm = model.model.language_model
    seq, pos, vis = embeds, pos3, visual
    scores = []
    for _ in range(steps):
        h = seq
        cos, sin = lm.rotary_emb(h, pos)
        for i, layer in enumerate(lm.layers):
            if i == k:
                keep = ~vis
                h, cos, sin = h[:, keep], cos[:, keep], sin[:, keep]
            n = h.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin))
        logits = model.lm_head(lm.norm(h))[:, -1]
        scores.append(logits)
        tok = logits.argmax(-1)
        seq = torch.cat([seq, lm.embed_tokens(tok)[:, None]], 1)
        nxt = pos[:, :, -1:] + 1
        pos = torch.cat([pos, nxt], 2)
        vis = torch.cat([vis, torch.zeros(1, dtype=torch.bool)])
    return scores


@pytest.mark.parametrize("k", [1, 2, 3])
def test_vtw_generate_equals_hand_written_reference(k):
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl", [[testing.make_image(224, 168, seed=5)]])
    lm = model.model.language_model
    grabbed = {}

    def grab(mod, args, kwargs):
        grabbed.setdefault("embeds", kwargs["inputs_embeds"])
        grabbed.setdefault("pos", kwargs["position_ids"][-3:])

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    visual = inputs["input_ids"][0] == model.config.image_token_id
    with torch.no_grad():
        ref = _reference(model, grabbed["embeds"], grabbed["pos"], visual, k, steps=4)
        with tc.compress(model, [tc.Stage(VTW(), site="llm", layers=[k])]) as run:
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    assert run.report().visual_tokens[k] == [0]
    assert run.report().visual_tokens[k - 1] == [int(visual.sum())]
    for got, want in zip(out.scores, ref):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert out.sequences[0, -4:].tolist() == [int(s.argmax()) for s in ref]


def test_kl_direction_matches_reference():
    p_full = torch.tensor([[2.0, 0.0, -1.0]])
    p_k = torch.tensor([[0.0, 1.0, 0.0]])
    # KLDivLoss(log_softmax(full), softmax(k), batchmean) == sum P_k (log P_k - log P_full)
    want = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(p_full, -1), torch.softmax(p_k, -1))
    torch.testing.assert_close(kl_withdrawn_vs_full(p_k, p_full).mean(), want)


def test_search_k_picks_first_layer_under_eta():
    model = cached_model("qwen2_vl")
    calib = [testing.tiny_inputs("qwen2_vl", [[testing.make_image(140, 112, seed=s)]]) for s in range(2)]
    loose = search_k(model, calib, eta=1e9, candidates=[1, 2, 3])
    assert loose.k == 1 and list(loose.kl) == [1]
    full = search_k(model, calib, eta=0.0 + 1e9, candidates=[3])
    assert full.k == 3
    # the KL of each candidate, recomputed by hand, picks the threshold between two layers
    kls = {}
    for k in (1, 2, 3):
        total = []
        for inp in calib:
            with torch.no_grad():
                ref = model(**inp).logits[:, -1]
                with tc.compress(model, [tc.Stage(VTW(), site="llm", layers=[k])]):
                    got = model(**inp).logits[:, -1]
            total.append(kl_withdrawn_vs_full(got, ref))
        kls[k] = float(torch.cat(total).mean())
    eta = kls[3] + 1e-9
    res = search_k(model, calib, eta=eta, candidates=[1, 2, 3])
    assert res.k == min(k for k in (1, 2, 3) if kls[k] <= eta)
    for k, v in res.kl.items():
        assert v == pytest.approx(kls[k], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="no candidate layer meets eta"):
        search_k(model, calib, eta=-1.0, candidates=[1, 2])
