"""The demo and the listing, through the console entry point's function."""

from __future__ import annotations

import json

from tokcomp import cli
from tokcomp.flops import LayerShape, llm_prefill_flops
from tokcomp.testing import tiny_config


def test_demo_json(capsys):
    assert cli.main(["demo", "--json", "--new-tokens", "3", "--layers", "6"]) == 0
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


def test_demo_table(capsys):
    assert cli.main(["demo", "--new-tokens", "2", "--layers", "4"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens entering each LLM layer" in out and "LLM prefill FLOPs" in out


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("spu", "oim", "fastv", "pact", "vtw", "tome", "random", "qwen2_vl", "luvc"):
        assert name in out
