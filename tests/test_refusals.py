"""Issue 11's refusals: every bad input gets a clear error naming the offending entry (stage index, key, and
what to write), at load or at `tc.compress`, never an AttributeError or a silently wrong run."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import all_hooks, cached_model
from tokcomp.strategies import OIM, SPU, FastV, ToMe

import tokcomp as tc
from tokcomp import registry, testing
from tokcomp.tokens import VisualItemTokens, VisualTokens


def _refused(data, *needles, error=tc.ScheduleError):
    with pytest.raises(error) as info:
        tc.Schedule.from_dict(data)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    return msg


def _stage(**kw):
    return {"stages": [{"strategy": "fastv", "layers": [2], **kw}]}


# ---------------------------------------------------------------------------------------------------------
# schedule files and dicts
# ---------------------------------------------------------------------------------------------------------
def test_unknown_top_level_key_suggests_stages():
    _refused({"stage": []}, "'stage'", "did you mean 'stages'")


def test_misspelt_stage_fields_suggest_the_valid_name():
    _refused(_stage(layer=[2]), "stage 0", "'layer'", "did you mean 'layers'")
    _refused(_stage(param={"keep_ratio": 0.5}), "stage 0", "'param'", "did you mean 'params'")
    _refused({"stages": [{"strategy": "spu"}, {"strategy": "fastv", "lyers": [2]}]}, "stage 1", "'lyers'",
             "'layers'")


def test_unknown_parameter_suggests_the_field():
    _refused(_stage(params={"keepratio": 0.5}), "stage 0 (fastv)", "'keepratio'", "did you mean 'keep_ratio'")


def test_parameter_at_the_stage_level_says_where_it_goes():
    _refused(_stage(keep_ratio=0.5), "stage 0 (fastv)", "'keep_ratio' is a parameter", '"params": {"keep_ratio": 0.5}')


def test_stages_beside_preset():
    _refused({"preset": "luvc", "stages": []}, "both 'preset' and 'stages'", "keep one")


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        ({"stages": {"strategy": "fastv"}}, ["'stages' must be a list"]),
        ({"stages": ["fastv"]}, ["stage 0", "a stage is a mapping"]),
        ({"stages": [{"strategy": 3}]}, ["stage 0", "'strategy' must be a registered strategy name"]),
        ({"stages": [{"layers": [2]}]}, ["stage 0", "missing 'strategy'"]),
        (_stage(site="llmm"), ["stage 0 (fastv)", "'site'", "did you mean 'llm'"]),
        (_stage(params=[0.5]), ["stage 0 (fastv)", "'params' must be a mapping"]),
        (_stage(params={"keep": 16.0}), ["stage 0 (fastv)", "keep=16.0", "an int or None"]),
        (_stage(params={"keep": True}), ["stage 0 (fastv)", "keep=True", "an int"]),
        (_stage(params={"query": "first"}), ["stage 0 (fastv)", "query='first'", "one of 'last', 'mean'"]),
        ({"preset": 3}, ["'preset' must be a preset name"]),
        ([1, 2], ["a schedule is a mapping"]),
    ],
)
def test_wrong_types_name_the_entry(data, needles):
    _refused(data, *needles)


@pytest.mark.parametrize("layers", ["2", "2,3", [2.0], 2.5, [True], {"from": 2}])
def test_layers_as_string_float_or_bool_are_refused(layers):
    _refused(_stage(layers=layers), "stage 0 (fastv)", "layers")
    if not isinstance(layers, dict):
        with pytest.raises(tc.ScheduleError, match="layers="):
            tc.Stage("fastv", layers=layers)


@pytest.mark.parametrize(("layers", "want"), [(2, [2]), (range(1, 4), [1, 2, 3]), ([3, 1], [3, 1]), ((2,), [2])])
def test_layers_forms_that_are_accepted(layers, want):
    assert tc.Stage("spu", layers=layers).layers == want


def test_malformed_json_says_where(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"stages": [\n  {"strategy": "fastv",}\n]}')
    with pytest.raises(tc.ScheduleError) as info:
        tc.Schedule.from_file(path)
    msg = str(info.value)
    assert "bad.json" in msg and "not valid JSON" in msg and "line 2" in msg and "column" in msg, msg


def test_malformed_yaml_says_where(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - strategy: fastv\n    layers: [2\n")
    with pytest.raises(tc.ScheduleError) as info:
        tc.Schedule.from_file(path)
    msg = str(info.value)
    assert "bad.yaml" in msg and "not valid YAML" in msg and "line" in msg, msg


def test_yaml_file_is_accepted_and_errors_name_the_file(tmp_path):
    path = tmp_path / "s.yml"
    path.write_text("stages:\n  - strategy: tome\n    site: projector\n    params: {r: [4, -1.0]}\n"
                    "  - strategy: fastv\n    layers: [2]\n    params:\n      keep: 8\n")
    sched = tc.Schedule.from_file(path)
    assert sched.stages[0].build_strategy().r == (4, -1.0)  # the (r, inflect) form, not a per-block list
    assert sched.stages[1].build_strategy().keep == 8
    path.write_text("stages:\n  - strategy: fastv\n    layer: [2]\n")
    with pytest.raises(tc.ScheduleError, match=r"s\.yml: stage 0 \(fastv\): unknown key 'layer'"):
        tc.Schedule.from_file(path)


def test_missing_file():
    with pytest.raises(tc.ScheduleError, match="cannot read the schedule file"):
        tc.Schedule.from_file("/nonexistent/s.json")


# ---------------------------------------------------------------------------------------------------------
# typed strategy parameters at compress()
# ---------------------------------------------------------------------------------------------------------
def _compress_fails(model, schedule, *needles):
    with pytest.raises(tc.ScheduleError) as info:
        tc.compress(model, schedule)
    msg = str(info.value)
    for n in needles:
        assert n in msg, msg
    assert all_hooks(model) == []


@pytest.mark.parametrize(
    ("stage", "needles"),
    [
        (lambda: tc.Stage(FastV(keep=16.0), layers=[2]), ["FastV(keep=16.0)", "an int or None"]),
        (lambda: tc.Stage(FastV(keep=True), layers=[2]), ["FastV(keep=True)", "an int"]),
        (lambda: tc.Stage(FastV(keep_ratio="0.5"), layers=[2]), ["keep_ratio", "'0.5'"]),
        (lambda: tc.Stage(SPU(steps=[[2, 0.5]]), layers=[2]), ["steps=[[2, 0.5]]", "tuple (int, number)"]),
        (lambda: tc.Stage(ToMe(r=[4, 0.5]), site="projector"), ["ToMe(r=[4, 0.5])", "a tuple (int, number)"]),
        (lambda: tc.Stage("fastv", layers=[2], keep=16.0), ["keep=16.0"]),
        (lambda: tc.Stage("fastv", layers=[2], keepratio=0.5), ["bad parameters", "did you mean 'keep_ratio'"]),
    ],
)
def test_wrong_typed_parameters_are_refused_at_compress(qwen, stage, needles):
    _compress_fails(qwen, [stage()], "stage 0", *needles)


def test_stage_index_is_the_failing_one(qwen):
    _compress_fails(qwen, [tc.Stage(OIM(), site="encoder", layers=[1]), tc.Stage(FastV(keep=1.5), layers=[2])],
                    "stage 1 (fastv", "keep=1.5")


def test_legal_forms_still_pass(qwen):
    for st in (ToMe(r=3), ToMe(r=(3, -1)), ToMe(r=(3, 0.5)), ToMe(r=[3])):
        tc.compress(qwen, [tc.Stage(st, site="projector")])
    tc.compress(qwen, [tc.Stage(FastV(keep_ratio=1), layers=[2])])  # an int is a legal float
    tc.compress(qwen, [tc.Stage(SPU(steps=[(2, 0.5)]), layers=[2, 3])])


def test_keys_at_encoder_block_zero_is_refused(qwen):
    _compress_fails(qwen, [tc.Stage(OIM(metric="keys"), site="encoder", layers=[0])], "stage 0",
                    "metric='keys' at encoder block 0", "metric='auto'")
    _compress_fails(qwen, [tc.Stage(ToMe(metric="keys"), site="projector")], "metric='keys'", "projector")
    tc.compress(qwen, [tc.Stage(OIM(metric="keys"), site="encoder", layers=[1])])
    tc.compress(qwen, [tc.Stage(OIM(), site="encoder", layers=[0])])  # auto: the hidden states at block 0


# ---------------------------------------------------------------------------------------------------------
# what compress() takes
# ---------------------------------------------------------------------------------------------------------
def test_compress_accepts_a_stage_a_dict_and_a_list_of_dicts(qwen):
    inputs = testing.tiny_inputs("qwen2_vl")
    counts = []
    for schedule in (
        tc.Stage("fastv", layers=[2], keep_ratio=0.5),
        {"stages": [{"strategy": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}]},
        [{"strategy": "fastv", "layers": [2], "params": {"keep_ratio": 0.5}}],
        [tc.Stage(FastV(keep_ratio=0.5), layers=[2])],
    ):
        with torch.no_grad(), tc.compress(qwen, schedule) as run:
            qwen(**inputs)
        counts.append(run.report().visual_tokens)
    assert all(c == counts[0] for c in counts) and counts[0][2] != counts[0][1]


@pytest.mark.parametrize(
    ("schedule", "needles"),
    [
        (FastV(), ["bare strategy FastV", "tc.Stage(FastV(...), site='llm'"]),
        (42, ["got int"]),
        ([tc.Stage("spu", layers=[2]), FastV()], ["stage 1", "got FastV", "wrap it in tc.Stage"]),
        ([{"strategy": "fastv", "layer": [2]}], ["stage 0 (fastv)", "did you mean 'layers'"]),
    ],
)
def test_compress_refuses_other_things_by_name(qwen, schedule, needles):
    _compress_fails(qwen, schedule, *needles)


# ---------------------------------------------------------------------------------------------------------
# plugin strategies whose output is invalid
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _BadLLM(tc.LLMStrategy):
    """Test-only: returns a chosen kind of invalid decision."""

    name = "test-bad-llm"
    how: str = "range"

    def select(self, view):
        n = view.num_present
        dev = view.hidden.device
        if self.how == "range":  # indexes the whole sequence instead of the visual tokens
            return tc.LLMDecision(keep=torch.arange(n + 2, device=dev))
        if self.how == "duplicate":
            return tc.LLMDecision(keep=torch.tensor([0, 0, 1], device=dev))
        if self.how == "mask":
            return tc.LLMDecision(keep=torch.ones(n, dtype=torch.bool, device=dev))
        if self.how == "unsorted":
            return tc.LLMDecision(keep=torch.tensor([2, 0], device=dev))
        keep2 = torch.arange(2, device=dev)
        if self.how == "members-shape":
            return tc.LLMDecision(keep=keep2, hidden=view.hidden[:2], members=torch.zeros(n - 1, dtype=torch.long))
        if self.how == "members-range":
            return tc.LLMDecision(keep=keep2, hidden=view.hidden[:2], members=torch.full((n,), 2))
        if self.how == "members-self":  # kept token 1 sent into kept token 0
            return tc.LLMDecision(keep=keep2, hidden=view.hidden[:2], members=torch.zeros(n, dtype=torch.long))
        if self.how == "members-float":
            return tc.LLMDecision(keep=keep2, hidden=view.hidden[:2], members=torch.zeros(n))
        if self.how == "members-no-hidden":
            return tc.LLMDecision(keep=keep2, members=torch.cat([keep2, torch.full((n - 2,), -1)]))
        return tc.LLMDecision(keep=torch.arange(2, device=dev), hidden=view.hidden[:3])


@pytest.mark.parametrize(
    ("how", "needle"),
    [("range", "outside [0,"), ("duplicate", "more than once"), ("mask", "boolean mask"),
     ("unsorted", "ascending"), ("hidden", "one row per kept token"),
     ("members-shape", "one entry per present token"), ("members-range", "or -1 (dropped)"),
     ("members-self", "every kept token into itself"), ("members-float", "long tensor"),
     ("members-no-hidden", "give the merged hidden states")],
)
def test_invalid_llm_decision_names_the_strategy(qwen, how, needle):
    inputs = testing.tiny_inputs("qwen2_vl")
    with pytest.raises(tc.RuntimeStateError) as info, torch.no_grad(), tc.compress(
        qwen, [tc.Stage(_BadLLM(how), layers=[2])]
    ):
        qwen(**inputs)
    msg = str(info.value)
    assert "strategy 'test-bad-llm'" in msg and "layer 2" in msg and needle in msg, msg
    assert all_hooks(qwen) == []


class _BadVisual(tc.contracts.VisualStrategy):
    """Test-only: wraps OIM at the encoder and spoils its result."""

    name = "test-bad-visual"

    def __init__(self, how):
        self.how = how

    def default_layers(self, num_layers):
        return [0]

    def reduce(self, tokens):
        out = OIM(rate=0.5, metric="hidden").reduce(tokens)
        items = list(out.items)
        if self.how == "reorder":
            items = items[::-1]
        elif self.how == "fresh-reorder":  # new grid tuples: the order cannot be traced through `original`
            items = [VisualItemTokens(it.kind, it.frames, tuple(it.original)) for it in items[::-1]]
        elif self.how == "drop":
            items = items[:-1]
        elif self.how == "grow":
            return VisualTokens(tokens.items + tokens.items, tokens.site, tokens.layer, tokens.num_layers,
                                tokens.stage_layers)
        return VisualTokens(items, out.site, out.layer, out.num_layers, out.stage_layers, out.multiple)


@pytest.mark.parametrize(
    ("how", "needle"),
    [("reorder", "output item 0 is input item 1 (the items are reordered)"),
     ("fresh-reorder", "output item 0 does not carry its input item's original grid object"),
     ("drop", "returned 1 items for the 2"),
     ("grow", "returned 4 items for the 2")],
)
def test_invalid_encoder_result_names_the_strategy(how, needle):
    """On LLaVA both images have one grid, so only the check tells a reordered result from a right one."""
    model = cached_model("llava")
    inputs = testing.tiny_inputs("llava", [[testing.make_image(64, 64, seed=1)], [testing.make_image(64, 64, seed=2)]])
    with torch.no_grad():
        model(**inputs)  # transformers registers its own output-recording hooks on the first call
    hooks = all_hooks(model)
    with pytest.raises(tc.RuntimeStateError) as info, torch.no_grad(), tc.compress(
        model, [tc.Stage(_BadVisual(how), site="encoder", layers=[0])]
    ):
        model(**inputs)
    msg = str(info.value)
    assert "strategy 'test-bad-visual'" in msg and "encoder site" in msg and needle in msg, msg
    assert all_hooks(model) == hooks


def test_a_valid_encoder_result_still_passes():
    model = cached_model("llava")
    inputs = testing.tiny_inputs("llava", [[testing.make_image(64, 64, seed=1)], [testing.make_image(64, 64, seed=2)]])
    with torch.no_grad(), tc.compress(model, [tc.Stage(_BadVisual("none"), site="encoder", layers=[0])]) as run:
        model(**inputs)
    assert run.report().original_visual < run.report().uncompressed_visual


# ---------------------------------------------------------------------------------------------------------
# registry: overlapping adapters, a raising supports(), a raising hook
# ---------------------------------------------------------------------------------------------------------
def _adapter_plugin(name, base, *, supports, priority=0):
    cls = type(f"Adapter_{name}", (base,), {"name": name, "priority": priority,
                                             "supports": classmethod(lambda c, m: supports(m)),
                                             "__doc__": "Test-only adapter."})
    mod = types.ModuleType(f"plugin_{name}")

    @tc.hookimpl
    def tokcomp_register_adapters(register):
        register(cls)

    mod.tokcomp_register_adapters = tokcomp_register_adapters
    return mod, cls


def test_adapter_order_is_fixed_and_a_raising_supports_is_skipped(qwen):
    base = type(tc.find_adapter(qwen))
    other = cached_model("llava")

    def boom(model):
        raise RuntimeError("supports() is broken")

    broken, _ = _adapter_plugin("z-broken", base, supports=boom)
    overlap, overlap_cls = _adapter_plugin("a-overlap", base, supports=lambda m: type(m) is type(qwen))
    try:
        registry.register_plugin(broken, name="broken-package")
        registry.register_plugin(overlap, name="overlap-package")
        order = [r.name for r in registry.adapter_order()]
        assert order.index("a-overlap") < order.index(base.name)  # a plugin before the built-in it overlaps
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert type(tc.find_adapter(qwen)) is overlap_cls
            assert type(tc.find_adapter(other)).name == "llava"  # the broken adapter breaks no other model
        assert any("'z-broken'" in str(w.message) and "broken-package" in str(w.message)
                   and "supports() is broken" in str(w.message) for w in caught)
        with pytest.warns(UserWarning, match="z-broken"):
            tc.compress(other, [tc.Stage("spu", layers=[2])])
    finally:
        for mod in (broken, overlap):
            if registry.plugin_manager().is_registered(mod):
                registry.unregister_plugin(mod)
        registry.reload()


def test_priority_decides_between_overlapping_adapters(qwen):
    base = type(tc.find_adapter(qwen))
    low, _ = _adapter_plugin("low", base, supports=lambda m: True)
    high, high_cls = _adapter_plugin("high", base, supports=lambda m: True, priority=5)
    try:
        registry.register_plugin(low, name="low-package")
        registry.register_plugin(high, name="high-package")
        assert type(tc.find_adapter(qwen)) is high_cls
    finally:
        for mod in (low, high):
            registry.unregister_plugin(mod)
        registry.reload()


def test_a_raising_hook_leaves_the_registry_as_it_was():
    mod = types.ModuleType("raising_plugin")

    @tc.hookimpl
    def tokcomp_register_strategies(register):
        register(type("Half", (tc.LLMStrategy,), {"name": "half-registered", "__doc__": "x"}))
        raise KeyError("the plugin failed half-way")

    mod.tokcomp_register_strategies = tokcomp_register_strategies
    before = set(registry.strategies())
    try:
        with pytest.raises(tc.PluginError) as info:
            registry.register_plugin(mod, name="raising-package")
        assert "'raising-package'" in str(info.value) and "tokcomp_register_strategies" in str(info.value)
        assert not registry.plugin_manager().is_registered(mod)
        assert set(registry.strategies()) == before  # nothing half-registered, and the registry still answers
    finally:
        registry.reload()


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
def _cli(*args):
    script = Path(sys.executable).parent / "tokcomp"  # the console script the package installs
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_bench_exits_nonzero_when_a_schedule_fails_to_load(tmp_path, capsys):
    from tokcomp.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stages": [{"strategy": "fastv", "layer": [2]}]}))
    assert main(["bench", "-s", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "stage 0 (fastv)" in err and "did you mean 'layers'" in err, err
    assert "Traceback" not in err
    assert main(["bench", "-s", "fastvv", "--no-progress"]) == 2
    assert "did you mean 'fastv'" in capsys.readouterr().err


def test_cli_visualize_names_missing_layers(tmp_path, capsys):
    from tokcomp.cli import main

    assert main(["visualize", "--layers", "2,99", "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--layers 99" in err and "fewer layers" in err and "8 LLM layers" in err, err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "args",
    [["bench", "--repeats", "x"], ["visualize", "--layers", "2,x"], ["visualize", "--arch", "nope"],
     ["list", "--bogus"], ["demo", "--new-tokens", "x"], ["nosuchcommand"]],
)
def test_cli_bad_arguments_exit_2_without_traceback(args):
    from tokcomp.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2


def test_cli_user_mistake_is_one_line_from_the_console_script(tmp_path):
    res = _cli("bench", "--model", "no-such-model", "--no-progress")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--model 'no-such-model'" in res.stderr, res.stderr
