"""PACT inside the LLM: identity, EUTI-only == mask oracle, proportional attention in prefill and decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model
from test_runtime_llm import _images, _mask_oracle
from tokcomp.strategies import PACT
from tokcomp.strategies.pact import euti_scores, non_text_mask

import tokcomp as tc
from tokcomp import testing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cutoff_zero_keep_one_is_identity(attn):
    model = cached_model("qwen2_vl", attn)
    inputs = testing.tiny_inputs("qwen2_vl", _images())
    with torch.no_grad():
        ref = model(**inputs).logits
        with tc.compress(model, [tc.Stage(PACT(keep_ratio=1.0, cutoff=0.0), layers=[2])]) as run:
            out = model(**inputs).logits
    valid = inputs["attention_mask"].bool()  # padding rows are garbage in both runs, and differ
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert run.report().visual_tokens[3] == run.report().original_visual


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_euti_only_equals_mask_oracle(attn):
    """With cutoff 0 no distinct tokens merge, so PACT is pure EUTI pruning: drop == mask holds."""
    model = cached_model("qwen2_vl", attn)
    inputs = testing.tiny_inputs("qwen2_vl", _images())
    with torch.no_grad(), tc.compress(model, [tc.Stage(PACT(keep_ratio=0.5, cutoff=0.0), layers=[2])]) as run:
        dropped = model(**inputs).logits
    keep = {i: run.kept_positions(i) for i in range(4)}
    assert run.report().visual_tokens[2] == [24, 17, 0]
    masked = _mask_oracle(model, inputs, keep)
    final = keep[3]
    for b in range(final.shape[0]):
        slots = final[b] >= 0
        torch.testing.assert_close(dropped[b, slots], masked[b, final[b][slots]], atol=2e-4, rtol=1e-4)


def test_view_projections_match_the_layer():
    """The q/k the runtime hands PACT are the layer's own: recomputed here from its modules and the
    model's own (cos, sin), the EUTI scores agree."""
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl", _images()[:1])
    layer = model.model.language_model.layers[2]
    captured = {}

    def grab(mod, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        captured["pe"] = kwargs["position_embeddings"]

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    seen = {}

    class Spy(PACT):
        name = "pact-spy"

        def select(self, view):
            p = view.projections()
            seen["scores"] = euti_scores(p.q, p.k, p.hidden, non_text_mask(p.visual), p.visual)
            return torch.arange(view.num_present)

    with torch.no_grad(), tc.compress(model, [tc.Stage(Spy(), layers=[2])]):
        model(**inputs)
    hs = captured["h"][0]
    attn = layer.self_attn
    x = layer.input_layernorm(hs)
    q = attn.q_proj(x).view(hs.shape[0], -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(hs.shape[0], -1, attn.head_dim).transpose(0, 1)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    want = euti_scores(q, k, hs, non_text_mask(visual), visual)
    torch.testing.assert_close(seen["scores"], want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_merged_tokens_decode_with_their_bias(attn):
    """Cached decoding (the log-size bias extended step by step) == recomputing the merged prefill."""
    model = cached_model("qwen2_vl", attn)
    batch = testing.tiny_inputs("qwen2_vl", _images())
    gen = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("pact-qwen2-vl")) as run:
        cached = model.generate(**batch, **gen)
        fresh = model.generate(**batch, **gen, use_cache=False)
        rep = run.report()
        single = model.generate(**testing.batch_item(batch, 0), **gen)
    assert any(e.info["retrieved"] or e.info["clusters"] < e.info["euti_kept"] for e in rep.events), "no merge"
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.scores, fresh.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(single.scores[0][0], cached.scores[0][0], atol=2e-4, rtol=1e-4)


def test_proportional_attention_matters():
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl", _images()[:1])
    outs = []
    for prop in (True, False):
        with torch.no_grad(), tc.compress(model, [tc.Stage(PACT(cutoff=0.3, proportional_attention=prop),
                                                           layers=[2])]):
            outs.append(model(**inputs).logits[:, -1])
    assert not torch.allclose(outs[0], outs[1])


def test_pact_validation(qwen):
    with pytest.raises(tc.ScheduleError, match="one layer"):
        tc.compress(qwen, [tc.Stage(PACT(), layers=[1, 2])])
    with pytest.raises(tc.ScheduleError, match="cutoff"):
        tc.compress(qwen, [tc.Stage(PACT(cutoff=-1), layers=[1])])
    lm = qwen.model.language_model
    old = lm.config._attn_implementation
    lm.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(tc.ScheduleError, match="proportional_attention=False"):
            tc.compress(qwen, [tc.Stage(PACT(), layers=[1])])
        tc.compress(qwen, [tc.Stage(PACT(proportional_attention=False), layers=[1])])
    finally:
        lm.config._attn_implementation = old
