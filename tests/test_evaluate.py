"""``tokcomp eval`` end to end on a small slice, the Wilson interval, and the shared budget schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tokcomp as tc
from tokcomp import evaluate, testing, train, vqa
from tokcomp.budgets import budget_schedules
from tokcomp.cli import main


def test_wilson_interval():
    # Reference values (Newcombe 1998, table I): 81/263 -> 0.2553-0.3662, 0/10 -> 0-0.2775.
    lo, hi = evaluate.wilson(81, 263)
    assert abs(lo - 0.2553) < 5e-4 and abs(hi - 0.3662) < 5e-4
    lo, hi = evaluate.wilson(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 5e-4
    # Symmetric under swapping successes and failures.
    a, b = evaluate.wilson(3, 17), evaluate.wilson(14, 17)
    assert math.isclose(a[0], 1 - b[1]) and math.isclose(a[1], 1 - b[0])


@pytest.fixture(scope="module")
def shipped():
    return testing.trained_model()


@pytest.fixture(scope="module")
def small_eval(shipped):
    model, processor = shipped
    return evaluate.evaluate(model, processor, ["fastv", "luvc"], budgets=[0.25], examples=7, batch=7,
                             progress=False)


def test_uncompressed_answers_equal_a_plain_forward(shipped, small_eval):
    # generate()'s first token under no schedule is the argmax of one forward pass (tokcomp.train.predict).
    model, processor = shipped
    items = vqa.make_examples(7, seed=0, split="test")
    assert small_eval.uncompressed.answers == train.predict(model, processor, items)
    truth = [e.answer for e in items]
    right = sum(a == t for a, t in zip(small_eval.uncompressed.answers, truth))
    assert small_eval.uncompressed.overall.correct == right


def test_every_schedule_is_scored_on_the_same_questions(small_eval):
    names = [s.name for s in small_eval.schedules]
    expected_budget = set(budget_schedules(small_eval.num_layers, 144, 0.25))
    assert names[:3] == ["uncompressed", "fastv", "luvc"] and set(names[3:]) == expected_budget
    items = vqa.make_examples(7, seed=0, split="test")
    for s in small_eval.schedules:
        assert s.error is None, (s.name, s.error)
        assert len(s.answers) == 7
        assert s.overall.correct == sum(a == e.answer for a, e in zip(s.answers, items))
        for q, acc in s.per_type.items():
            assert acc.total == sum(e.qtype == q for e in items)
            lo, hi = acc.interval
            assert lo <= acc.value <= hi
        assert s.agreement == sum(a == b for a, b in zip(s.answers, small_eval.uncompressed.answers)) / 7
        assert 0 < s.retained <= 1 and s.speedup > 0
    # FastV at layer 2 keeping half: (2 + 4 * 72/144) / 6 of the tokens over 6 layers.
    fastv = small_eval.by_name("fastv")
    layers = small_eval.num_layers
    assert math.isclose(fastv.retained, (2 + (layers - 2) * 72 / 144) / layers, rel_tol=1e-6)
    assert small_eval.by_name("downsample@0.25").retained < 0.3


def test_cli_writes_json_with_every_field_and_a_png(tmp_path, capsys):
    code = main(["eval", "-s", "vtw", "--budgets", "0.5", "--examples", "7", "--batch", "7", "--out",
                 str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "vtw" in out and "random@0.50" in out
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data) == {"model", "task", "batch", "budgets", "num_layers", "visual_tokens", "wall_s",
                         "machine", "schedules"}
    assert data["visual_tokens"] == 144 and data["budgets"] == [0.5]
    fields = {"name", "kind", "strategy", "budget", "description", "overall", "per_type", "agreement",
              "retained", "prefill_s", "speedup", "answers", "error"}
    for s in data["schedules"]:
        assert set(s) == fields
        assert set(s["overall"]) == {"correct", "total", "accuracy", "ci95"}
        assert set(s["per_type"]) == set(vqa.QTYPES)
    kinds = {s["name"]: s["kind"] for s in data["schedules"]}
    assert kinds["uncompressed"] == "uncompressed" and kinds["vtw"] == "preset"
    assert kinds["random@0.50"] == "budget"
    png = (tmp_path / "eval.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_failing_schedule_is_reported_and_the_rest_still_run(shipped):
    model, processor = shipped

    from tokcomp.strategies import RandomPrune

    class Broken(RandomPrune):
        def select(self, view):
            raise RuntimeError("boom")

    res = evaluate.evaluate(
        model, processor, {"broken": tc.Schedule([tc.Stage(Broken(keep_ratio=0.5), site="llm", layers=[2])]),
                           "spu": "spu"},
        budgets=(), examples=7, batch=7, progress=False,
    )
    assert "boom" in res.by_name("broken").error
    assert res.by_name("spu").error is None and len(res.by_name("spu").answers) == 7


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as err:
        main(["eval", "--budgets", "half"])
    assert err.value.code == 2
    assert "--budgets" in capsys.readouterr().err


def test_budget_schedules_reach_their_budget_on_a_deep_enough_model():
    model = testing.tiny_model("qwen2_vl", num_hidden_layers=8)
    inputs = testing.tiny_inputs("qwen2_vl")
    for name, sched in budget_schedules(8, 48, 0.5).items():
        if name.startswith(("fastv", "random", "vtw", "spu")):
            with torch.no_grad(), tc.compress(model, sched) as run:
                model(**inputs)
            assert abs(run.report().retained_fraction() - 0.5) < 0.07, name
