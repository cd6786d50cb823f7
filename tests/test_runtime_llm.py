"""The LLM-side runtime on real tiny models: identity, drop == mask, batch == samples, KV cache, dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import all_hooks, cached_model
from tokcomp.strategies import SPU, VTW, FastV, RandomPrune

import tokcomp as tc
from tokcomp import testing
from tokcomp.kvcache import stored_length

LLM_STRATEGIES = {
    "spu": lambda: tc.Stage(SPU(), site="llm", layers=range(1, 4)),
    "spu-hidden": lambda: tc.Stage(SPU(axis="hidden"), site="llm", layers=[1, 3]),
    "spu-grid": lambda: tc.Stage(SPU(axis="grid", score="residual"), site="llm", layers=[2, 3]),
    "fastv": lambda: tc.Stage(FastV(keep_ratio=0.4), site="llm", layers=[2]),
    "fastv-mean": lambda: tc.Stage(FastV(keep_ratio=0.4, query="mean"), site="llm", layers=[1]),
    "vtw": lambda: tc.Stage(VTW(), site="llm", layers=[2]),
    "random": lambda: tc.Stage(RandomPrune(keep_ratio=0.3, seed=3), site="llm", layers=[0, 2]),
}


def _images():
    return [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)], []]


_mask_oracle = testing.masked_logits  # the drop-equals-mask oracle, shared with plugin authors


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_empty_schedule_is_identity_and_leaves_nothing_behind(attn):
    model = cached_model("qwen2_vl", attn)
    inputs = testing.tiny_inputs("qwen2_vl", _images())
    before_hooks = all_hooks(model)
    before_attrs = set(model.__dict__)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tc.compress(model, tc.Schedule([])) as run:
            out = model(**inputs).logits
    assert torch.equal(ref, out)
    assert run.report().visual_tokens[0] == run.report().original_visual
    assert all_hooks(model) == before_hooks
    assert set(model.__dict__) == before_attrs


def test_hooks_removed_on_exception(qwen):
    inputs = testing.tiny_inputs("qwen2_vl")
    with pytest.raises(KeyboardInterrupt), tc.compress(qwen, tc.Schedule.preset("spu")):
        qwen(**inputs)
        assert all_hooks(qwen)  # installed while inside
        raise KeyboardInterrupt
    assert all_hooks(qwen) == []
    assert "_tokcomp_active" not in qwen.__dict__
    with torch.no_grad():  # and the model is back to normal
        ref = qwen(**inputs).logits
    assert ref.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("name", sorted(LLM_STRATEGIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_drop_equals_mask(name, attn):
    model = cached_model("qwen2_vl", attn)
    inputs = testing.tiny_inputs("qwen2_vl", _images())
    stage = LLM_STRATEGIES[name]()
    with torch.no_grad(), tc.compress(model, tc.Schedule([stage])) as run:
        dropped = model(**inputs).logits
    keep = {i: run.kept_positions(i) for i in range(4)}
    final = keep[3]
    assert final.shape[1] < inputs["input_ids"].shape[1], "the strategy removed nothing: test is vacuous"
    masked = _mask_oracle(model, inputs, keep)
    valid = inputs["attention_mask"].bool()
    for b in range(final.shape[0]):
        slots = (final[b] >= 0) & valid[b, final[b].clamp(min=0)]
        got = dropped[b, slots]
        want = masked[b, final[b][slots]]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["spu", "fastv", "vtw", "random"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batch_equals_samples_alone(name, attn):
    model = cached_model("qwen2_vl", attn)
    samples = _images()
    batch = testing.tiny_inputs("qwen2_vl", samples)
    assert not bool(batch["attention_mask"].all()), "batch must be padded"
    stage = LLM_STRATEGIES[name]()
    with torch.no_grad(), tc.compress(model, tc.Schedule([stage])) as run:
        out = model(**batch).logits[:, -1]
        counts = run.report().visual_tokens
        singles = []
        for i in range(len(samples)):
            singles.append(model(**testing.batch_item(batch, i)).logits[:, -1])
            assert [row[0] for row in run.report().visual_tokens] == [row[i] for row in counts]
    assert counts[-1][2] == 0 == counts[0][2], "the text-only sample has no visual token"
    for i, single in enumerate(singles):
        torch.testing.assert_close(out[i], single[0], atol=2e-4, rtol=1e-4)


def test_text_only_sample_untouched():
    model = cached_model("qwen2_vl")
    batch = testing.tiny_inputs("qwen2_vl", [[], []], prompts=["w1 w2 w3", "w4 w5 w6 w7 w8"])
    with torch.no_grad():
        ref = model(**batch).logits
        with tc.compress(model, tc.Schedule.preset("spu")):
            out = model(**batch).logits
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", ["spu", "vtw", "random", "fastv"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_with_cache_equals_recompute(name, attn):
    """Cached decoding over layers of different lengths equals re-running the compressed prefill on the
    whole sequence at every step (no cache). FastV re-scores with each step's last token without a cache
    (its reference behaviour), so for it the check is: the first token agrees and decoding is consistent
    with a batch of one."""
    model = cached_model("qwen2_vl", attn)
    batch = testing.tiny_inputs("qwen2_vl", _images())
    stage = LLM_STRATEGIES[name]()
    gen = {"max_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad(), tc.compress(model, tc.Schedule([stage])) as run:
        cached = model.generate(**batch, **gen)
        cache = cached.past_key_values
        lengths = [stored_length(cache, i) for i in range(4)]  # physical: get_seq_length is logical
        fresh = model.generate(**batch, **gen, use_cache=False)
    L = batch["input_ids"].shape[1]
    if min(stage.layers) > 0:
        assert lengths[0] == L + 4, "layer 0 keeps the uncompressed length: positions continue from it"
        assert lengths[-1] < lengths[0]
    else:  # a stage at layer 0 shortens every layer's cache; decoding must still be right (below)
        assert lengths[0] < L + 4
    assert run.num_prefills >= 2
    if name == "fastv":
        torch.testing.assert_close(cached.scores[0], fresh.scores[0], atol=2e-4, rtol=1e-4)
    else:
        assert torch.equal(cached.sequences, fresh.sequences)
        for a, b in zip(cached.scores, fresh.scores):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_generate_batch_equals_samples_alone():
    model = cached_model("qwen2_vl")
    samples = _images()
    batch = testing.tiny_inputs("qwen2_vl", samples)
    gen = {"max_new_tokens": 5, "do_sample": False}
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("spu")):
        out = model.generate(**batch, **gen)[:, L:]
        for i in range(len(samples)):
            one = testing.batch_item(batch, i)
            single = model.generate(**one, **gen)[:, one["input_ids"].shape[1]:]
            assert torch.equal(single[0], out[i])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_matches_mask(dtype):
    model = cached_model("qwen2_vl", "sdpa", dtype)
    inputs = testing.tiny_inputs("qwen2_vl", _images(), dtype=dtype)
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("spu")) as run:
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all()
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert run.report().visual_tokens[-1] == [0, 0, 0]
    keep = {i: run.kept_positions(i) for i in range(4)}
    masked = _mask_oracle(model, inputs, keep)
    final = keep[3]
    for b in range(final.shape[0]):
        slots = final[b] >= 0
        torch.testing.assert_close(logits[b, slots][-1].float(), masked[b, final[b][slots]][-1].float(),
                                   atol=0.1, rtol=0.05)


def test_report_counts_tokens_per_layer_and_stage(qwen):
    inputs = testing.tiny_inputs("qwen2_vl", _images())
    with torch.no_grad(), tc.compress(qwen, tc.Schedule([LLM_STRATEGIES["spu"]()])) as run:
        qwen(**inputs)
    rep = run.report()
    n0 = rep.original_visual
    assert n0[2] == 0 and n0[0] > 0 and n0[1] > 0
    # the SPU cascade from layer 1 to 3: ceil(n0 * (3 - t) / 3) tokens enter layer t, none enter layer 3
    import math

    for t in range(4):
        want = [n if t < 1 else math.ceil(n * (3 - t) / 3) for n in n0]
        assert rep.visual_tokens[t] == want
    ev = [e for e in rep.events if e.sample == 0]
    assert [(e.layer, e.tokens_in, e.tokens_out) for e in ev] == [
        (1, n0[0], rep.visual_tokens[1][0]),
        (2, rep.visual_tokens[1][0], rep.visual_tokens[2][0]),
        (3, rep.visual_tokens[2][0], 0),
    ]
    assert "visual tokens entering each LLM layer" in str(rep)
    assert rep.to_dict()["retained_fraction"] < 1


def test_qwen2_5_vl_runs_compressed_through_generate():
    model = cached_model("qwen2_5_vl")
    batch = testing.tiny_inputs("qwen2_5_vl", _images())
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("spu")) as run:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        single = model.generate(**testing.batch_item(batch, 1), max_new_tokens=4, do_sample=False)
    assert run.report().visual_tokens[-1] == [0]
    assert torch.equal(out[1, -4:], single[0, -4:])


def test_video_items_have_their_grid():
    model = cached_model("qwen2_vl")
    frames = [testing.make_image(112, 84, seed=s) for s in range(4)]
    batch = testing.tiny_inputs("qwen2_vl", [[testing.make_image(112, 112)], []], videos=[[], frames])
    seen = {}

    class Spy(tc.LLMStrategy):
        name = "spy"

        def select(self, view):
            seen[view.sample] = view.layout.items
            return torch.arange(view.num_present)

    with torch.no_grad(), tc.compress(model, [tc.Stage(Spy(), layers=[1])]):
        model(**batch)
    assert [i.kind for i in seen[0]] == ["image"]
    vid = seen[1][0]
    t, h, w = (int(x) for x in batch["video_grid_thw"][0])
    assert vid.kind == "video" and vid.grid == (t, h // 2, w // 2) and vid.count == t * h * w // 4
