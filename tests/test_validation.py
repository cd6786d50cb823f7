"""Every invalid schedule fails at compress(), before anything runs, with a message saying what to change."""

from __future__ import annotations

import pytest
import torch
from conftest import all_hooks, cached_model
from tokcomp.strategies import SPU, VTW, FastV, RandomPrune

import tokcomp as tc


def _fails(model, schedule, *needles):
    with pytest.raises(tc.TokcompError) as info:
        tc.compress(model, schedule)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    assert all_hooks(model) == []
    return msg


def test_layer_past_depth(qwen):
    _fails(qwen, [tc.Stage(SPU(), site="llm", layers=[2, 4])], "[4]", "4 decoder layers", "0..3")
    _fails(qwen, [tc.Stage(FastV(), site="llm", layers=[-1])], "[-1]")


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval(qwen, ratio):
    _fails(qwen, [tc.Stage(FastV(keep_ratio=ratio), site="llm", layers=[2])], "keep_ratio must be in (0, 1]")
    _fails(qwen, [tc.Stage("random", site="llm", layers=[1], keep_ratio=ratio)], "keep_ratio")


def test_unknown_strategy_name_suggests_close_match(qwen):
    _fails(qwen, [tc.Stage("fastvv", site="llm", layers=[2])], "unknown strategy 'fastvv'", "'fastv'")


def test_bad_parameters_for_named_strategy(qwen):
    _fails(qwen, [tc.Stage("fastv", site="llm", layers=[2], ratio=0.5)], "bad parameters")


def test_strategy_at_unsupported_site(qwen):
    _fails(qwen, [tc.Stage(SPU(), site="encoder", layers=[0])], "cannot run at site 'encoder'", "llm")
    _fails(qwen, [tc.Stage(SPU(), site="vision", layers=[0])], "unknown site 'vision'")


def test_model_without_adapter():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(tc.UnsupportedModelError) as info:
        tc.compress(model, [tc.Stage(SPU(), site="llm")])
    assert "LlamaForCausalLM" in str(info.value)
    assert "Qwen2VLForConditionalGeneration" in str(info.value)


def test_fastv_at_layer_zero_and_vtw_with_many_layers(qwen):
    _fails(qwen, [tc.Stage(FastV(), site="llm", layers=[0])], "layers >= 1")
    _fails(qwen, [tc.Stage(VTW(), site="llm", layers=[1, 2])], "one layer")


def test_unsupported_attention_backend_is_refused_not_swapped():
    model = cached_model("qwen2_vl", "sdpa")
    lm = model.model.language_model
    old = lm.config._attn_implementation
    lm.config._attn_implementation = "flex_attention"
    try:
        _fails(model, [tc.Stage(SPU(), site="llm")], "flex_attention", "sdpa")
    finally:
        lm.config._attn_implementation = old


def test_spu_parameters(qwen):
    _fails(qwen, [tc.Stage(SPU(cutoff=0), site="llm")], "cutoff")
    _fails(qwen, [tc.Stage(SPU(axis="time"), site="llm")], "axis")
    _fails(qwen, [tc.Stage(SPU(steps=[(9, 0.5)]), site="llm", layers=[1, 2])], "step layer 9")


def test_stage_rejects_params_next_to_instance():
    with pytest.raises(tc.ScheduleError, match="next to a strategy instance"):
        tc.Stage(RandomPrune(), site="llm", keep_ratio=0.2)


def test_schedule_round_trips_through_dict(qwen, tmp_path):
    sched = tc.Schedule([tc.Stage(FastV(keep_ratio=0.25, query="mean"), site="llm", layers=[2])])
    path = tmp_path / "s.json"
    import json

    path.write_text(json.dumps(sched.to_dict()))
    back = tc.Schedule.from_file(path)
    st = back.stages[0].build_strategy()
    assert isinstance(st, FastV) and st.keep_ratio == 0.25 and st.query == "mean"
    assert back.stages[0].layers == [2]
    assert tc.Schedule.from_dict({"preset": "spu"}).name == "spu"


def test_nesting_is_refused(qwen):
    with tc.compress(qwen, tc.Schedule.preset("spu")), pytest.raises(tc.RuntimeStateError, match="already inside"):
        with tc.compress(qwen, tc.Schedule.preset("fastv")):
            pass
    assert all_hooks(qwen) == []


def test_static_cache_is_refused_clearly(qwen):
    from tokcomp import testing

    inputs = testing.tiny_inputs("qwen2_vl")
    with tc.compress(qwen, tc.Schedule.preset("spu")), pytest.raises(tc.RuntimeStateError, match="DynamicCache"):
        with torch.no_grad():
            qwen.generate(**inputs, max_new_tokens=2, cache_implementation="static")
