"""The demo and the listing, through the console entry point's function."""

from __future__ import annotations

import json

import pytest

from tokcomp import cli, testing, vqa
from tokcomp.flops import LayerShape, llm_prefill_flops
from tokcomp.testing import tiny_config, tiny_inputs
from tokcomp.train import predict


def test_demo_answers_questions_with_the_trained_model(capsys):
    assert cli.main(["demo", "--json", "--examples", "14"]) == 0
    res = json.loads(capsys.readouterr().out)
    items = vqa.make_examples(14, seed=0, split="test")
    assert [q["question"] for q in res["questions"]] == [e.question for e in items[:6]]
    assert [q["answer"] for q in res["questions"]] == [e.answer for e in items[:6]]
    # The uncompressed answers are the plain forward's argmax (an independent path to generate()).
    model, processor = testing.trained_model()
    assert [q["uncompressed"] for q in res["questions"]] == predict(model, processor, items[:6])
    right = sum(a == e.answer for a, e in zip(predict(model, processor, items), items))
    assert res["accuracy_uncompressed"] == right / 14
    assert res["uncompressed_visual"] == 144 and res["visual_tokens"][0] == 144
    assert len(res["visual_tokens"]) == model.config.text_config.num_hidden_layers
    assert res["visual_tokens"][-1] == 0  # SPU's cascade ends at zero visual tokens
    assert 0 < res["retained"] < 1 and res["speedup"] > 0
    lo, hi = res["ci_compressed"]
    assert lo <= res["accuracy_compressed"] <= hi


def test_demo_table(capsys):
    assert cli.main(["demo", "--examples", "7"]) == 0
    out = capsys.readouterr().out
    assert "held-out questions" in out and "measured prefill speed-up" in out


def test_random_demo_json(capsys):
    assert cli.main(["demo", "--arch", "qwen2_vl", "--json", "--new-tokens", "3", "--layers", "6"]) == 0
    res = json.loads(capsys.readouterr().out)
    n0 = res["original_visual"]
    counts = res["visual_tokens"]
    assert len(counts) == 6 and counts[0] == n0 and counts[-1] == [0] * len(n0)
    assert all(len(t) == 3 for t in res["tokens_compressed"])
    assert 0.0 <= res["agreement"] <= 1.0
    # the FLOPs ratio follows from the token counts by the published formula
    shape = LayerShape.from_text_config(tiny_config("qwen2_vl", num_hidden_layers=6).text_config)
    assert 0 < res["flops_ratio"] < 1
    text = [t for t in res["text_tokens"]]
    comp = sum(llm_prefill_flops(shape, [text[b] + row[b] for row in counts])["total"] for b in range(len(n0)))
    base = sum(llm_prefill_flops(shape, [text[b] + n0[b]] * 6)["total"] for b in range(len(n0)))
    assert abs(res["flops_ratio"] - comp / base) < 1e-9


def test_random_demo_table(capsys):
    assert cli.main(["demo", "--arch", "qwen2_vl", "--new-tokens", "2", "--layers", "4"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens entering each LLM layer" in out and "LLM prefill FLOPs" in out


def test_random_demo_luvc_shows_the_uncompressed_counts(capsys):
    # luvc's OIM shrinks the tokens inside the vision tower; the "uncompressed" column must still be the
    # image placeholders the processor wrote, not the counts after OIM.
    assert cli.main(["demo", "--arch", "qwen2_vl", "--preset", "luvc", "--json", "--new-tokens", "2",
                     "--layers", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    inputs = tiny_inputs("qwen2_vl")
    placeholders = (inputs["input_ids"] == tiny_config("qwen2_vl").image_token_id).sum(-1).tolist()
    assert res["original_visual"] == placeholders
    assert all(c < p for c, p in zip(res["visual_tokens"][0], placeholders))


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("spu", "oim", "fastv", "pact", "vtw", "tome", "random", "qwen2_vl", "luvc"):
        assert name in out


def test_version_and_python_dash_m(capsys):
    import subprocess
    import sys

    import tokcomp

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"tokcomp {tokcomp.__version__}"
    proc = subprocess.run([sys.executable, "-m", "tokcomp", "--version"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tokcomp {tokcomp.__version__}"


@pytest.mark.parametrize("command", ["demo", "bench", "eval", "visualize"])
def test_every_option_help_shows_its_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.count("(default:") >= 2, text


def test_bad_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--arch", "gpt2"])
    assert info.value.code == 2 and "invalid choice: 'gpt2'" in capsys.readouterr().err
